from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib.errors import InputError
from CMBDetectorLib.engine.preprocessing import (brain_mask, check_mask, check_modality, check_volume,
                                          normalise, prepare)
from CMBDetectorLib.engine.settings import DetectionSettings
from CMBDetectorLib.engine.volume import Volume


def _tissue_with_spot(value_tissue, value_spot):
    a = np.full((20, 20, 20), value_tissue, np.float32)
    a += np.random.default_rng(0).normal(0, 1, a.shape).astype(np.float32)
    a[10, 10, 10] = value_spot
    return a, np.ones(a.shape, bool)


@pytest.mark.parametrize("modality", ["gre", "swi"])
def test_magnitude_is_inverted_so_dark_foci_are_positive(modality):
    a, m = _tissue_with_spot(100.0, 10.0)
    n = normalise(a, m, modality)
    assert n[10, 10, 10] > 0.5 and abs(np.median(n)) < 0.05


def test_qsm_keeps_sign_paramagnetic_bright_diamagnetic_negative():
    a, m = _tissue_with_spot(0.0, 5.0)
    a[5, 5, 5] = -5.0
    n = normalise(a, m, "qsm")
    assert n[10, 10, 10] > 0.5 and n[5, 5, 5] < -0.5


@pytest.mark.parametrize("modality", ["qsm", "gre"])
def test_iqr_scaling_ignores_how_many_veins_a_scan_holds(modality):
    """A clinical QSM with fewer bright veins must not have its tissue contrast amplified: the
    percentile scale follows the veins, the ``iqr`` scale does not."""
    rng = np.random.default_rng(0)
    tissue = rng.normal(0.0, 1.0, (40, 40, 40)).astype(np.float32)
    if modality == "gre":
        tissue += 100.0
    mask = np.ones(tissue.shape, bool)
    vein = 30.0 if modality == "qsm" else 40.0
    many, few = tissue.copy(), tissue.copy()
    many.reshape(-1)[rng.choice(many.size, many.size // 50, replace=False)] = vein  # 2 %
    few.reshape(-1)[rng.choice(few.size, few.size // 1000, replace=False)] = vein  # 0.1 %
    spot = (20, 20, 20)
    for a in (many, few):
        a[spot] = 8.0 if modality == "qsm" else 92.0
    pct = [normalise(a, mask, modality)[spot] for a in (many, few)]
    iqr = [normalise(a, mask, modality, "iqr")[spot] for a in (many, few)]
    assert pct[1] > 1.5 * pct[0]  # the defect: fewer veins, the same spot twice as bright
    assert abs(iqr[1] - iqr[0]) < 0.05 * iqr[0]  # 2 % of veins move the quartiles ~3 %
    assert iqr[0] > 0.5  # still a positive focus of about the percentile scale's size


def test_normalisation_setting_is_checked_and_reaches_prepare(small_subject):
    with pytest.raises(InputError, match="normalisation"):
        DetectionSettings(normalisation="zscore").validate()
    vol = small_subject.images["qsm"]
    a = prepare(vol, "qsm", None, DetectionSettings()).image
    b = prepare(vol, "qsm", None, DetectionSettings(normalisation="iqr")).image
    assert a.shape == b.shape and not np.allclose(a, b)
    assert abs(float(np.median(b[b != 0]))) < 0.05


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((10, 10)), "3D"),
    (np.zeros((30, 30, 30, 2)), "3D"),
    (np.full((30, 30, 30), 7.0), "constant"),
    (np.zeros((5, 40, 40)) + np.arange(40), "field of view"),
])
def test_check_volume_rejects(bad, msg):
    with pytest.raises(InputError, match=msg):
        check_volume(Volume(np.asarray(bad, np.float32)))


def test_nan_rejected():
    a = np.random.default_rng(0).random((30, 30, 30)).astype(np.float32)
    a[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_volume(Volume(a))


def test_modality_aliases_and_unknown():
    assert check_modality("T2*") == "gre" and check_modality("QSM") == "qsm"
    with pytest.raises(InputError, match="unknown modality"):
        check_modality("flair")


def test_mask_on_other_grid_rejected():
    v = Volume.from_arrays(np.random.default_rng(0).random((30, 30, 30)))
    with pytest.raises(InputError, match="another grid"):
        check_mask(Volume.from_arrays(np.ones((30, 30, 31))), v)


@pytest.mark.parametrize("modality", ["swi", "gre", "qsm"])
def test_brain_mask_matches_simulated_truth(whole_subject, modality):
    from CMBDetectorLib.engine.preprocessing import to_working_grid
    from CMBDetectorLib.engine.volume import resample

    work = to_working_grid(whole_subject.images[modality], 1.0)
    truth = resample(whole_subject.brain_mask, None, "nearest", reference=work).array > 0
    est = brain_mask(work.array, 1.0, modality)
    dice = 2 * (est & truth).sum() / (est.sum() + truth.sum())
    assert dice > 0.93


@pytest.mark.parametrize("modality", ["swi", "gre"])
def test_log_brain_mask_follows_anatomy_not_intensity_curve(whole_subject, modality):
    # a gamma or a gain on the magnitude (another scanner's curve) keeps the log-threshold
    # mask, where both are affine; the intensity threshold follows the curve
    from CMBDetectorLib.engine.preprocessing import to_working_grid

    a = np.maximum(to_working_grid(whole_subject.images[modality], 1.0).array, 0)
    est = brain_mask(a, 1.0, modality, threshold="log")
    moved = {}
    for name, changed in (("gamma 0.7", a ** 0.7), ("gamma 1.4", a ** 1.4), ("gain", 40.0 * a)):
        moved[name] = (brain_mask(changed, 1.0, modality, threshold="log") ^ est).sum() / est.sum()
    assert max(moved.values()) < 0.005, moved
    plain = brain_mask(a, 1.0, modality)
    assert (brain_mask(a ** 0.7, 1.0, modality) ^ plain).sum() / plain.sum() > 0.005


def test_prepare_outputs_consistent_grid(small_subject):
    p = prepare(small_subject.images["swi"], "swi", None, DetectionSettings())
    assert p.image.shape == p.frst.shape == p.mask.shape
    np.testing.assert_allclose(p.grid.spacing, 1.0, atol=1e-6)
    assert p.image[~p.mask].max() == 0 and p.frst.dtype == np.float32


def test_mask_closing_keeps_tissue_beyond_a_thin_dark_band():
    # a 40 mm brain whose upper half has a 3 mm dark band at 35-38 mm (SWI's darkened rim):
    # without closing the tissue beyond the band falls out of the mask, with 3 mm it stays
    z, y, x = np.indices((96, 96, 96)) - 47.5
    r = np.sqrt(x * x + y * y + z * z)
    a = np.where(r < 40, 100.0, 0.0).astype(np.float32)
    a[(r >= 35) & (r < 38) & (z > 5)] = 5.0
    beyond = (r >= 38.5) & (r < 39.5) & (z > 15)
    plain = brain_mask(a, 1.0, "swi")
    closed = brain_mask(a, 1.0, "swi", closing_mm=3.0)
    assert plain[beyond].mean() < 0.1 and closed[beyond].mean() > 0.9
    # the closing does not grow the mask into the background
    assert not closed[r > 44].any()
    with pytest.raises(InputError, match="mask_closing_mm"):
        DetectionSettings(mask_closing_mm=-1.0).validate()


def _brain_like(modality, seed=0):
    """Tissue with a dark (GRE/SWI) or bright (QSM) tail of veins and foci."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 40)
    if modality == "qsm":
        a = rng.normal(0.0, 0.02, shape)
        a.reshape(-1)[rng.choice(a.size, a.size // 100, replace=False)] = rng.uniform(0.1, 0.6, a.size // 100)
        a[20, 20, 20] = 0.5
    else:
        a = rng.normal(100.0, 5.0, shape)
        a.reshape(-1)[rng.choice(a.size, a.size // 100, replace=False)] = rng.uniform(10.0, 60.0, a.size // 100)
        a[20, 20, 20] = 20.0
    return a.astype(np.float32), np.ones(shape, bool)


@pytest.mark.parametrize("modality", ["swi", "qsm"])
@pytest.mark.parametrize("gamma", [0.7, 1.4])
def test_quantile_scaling_barely_moves_under_a_gamma_change(modality, gamma):
    """The invariance gate's gamma change (on the scan's own range) moves every iqr-normalised
    value of the tail; the quantile map follows the histogram and stays put."""
    from CMBDetectorLib.evaluation.invariance import gamma_change

    a, mask = _brain_like(modality)
    b = gamma_change(Volume(a, np.eye(4)), gamma).array
    n_iqr = normalise(a, mask, modality, "iqr")
    tail = (n_iqr > 0.3) & (n_iqr < 2.9)  # veins, not clipped
    diff = {m: np.abs(normalise(a, mask, modality, m) - normalise(b, mask, modality, m))[tail]
            for m in ("iqr", "quantile")}
    assert np.median(diff["quantile"]) < 0.02
    assert np.median(diff["quantile"]) < np.median(diff["iqr"]) / 4
    n = normalise(a, mask, modality, "quantile")
    assert abs(np.median(n)) < 0.01 and n[20, 20, 20] > 0.5  # tissue at 0, the focus positive
    q25, q75 = np.percentile(n, [25, 75])
    assert q75 - q25 == pytest.approx(1 / 3.5, rel=0.05)  # the iqr mode's tissue scale


def test_quantile_map_is_monotone_and_survives_a_plateau():
    from CMBDetectorLib.engine.preprocessing import quantile_map

    inside = np.concatenate([np.zeros(5000), np.linspace(-1, 1, 5000)])  # half the brain is 0
    v = np.linspace(-3, 3, 1001)
    out = quantile_map(v, inside)
    assert np.all(np.isfinite(out)) and np.all(np.diff(out) >= 0)
    assert out[-1] > out[500] > out[0]
