"""The shipped models must not depend on one scanner's intensity curve: a scan and the same
scan after a monotone intensity change (gamma 0.7-1.4), another bias field or more noise give
the same lesions."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

#: A lesion counts as the same when its centroid moved less than this (mm).
MATCH_MM = 2.0


def gamma_change(vol, gamma: float):
    """Monotone gamma on the scan's own range (QSM's sign kept through the shift); a QSM's
    zero outside its reconstruction mask stays zero, as a pipeline writes it."""
    a = vol.array.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    out = (lo + (hi - lo) * ((a - lo) / (hi - lo)) ** gamma).astype(np.float32)
    if lo < 0:
        out[a == 0] = 0.0
    return vol.with_array(out)


def bias_change(vol, strength: float = 0.25):
    """Multiply by a smooth field: +-``strength`` along a diagonal of the field of view."""
    a = vol.array.astype(np.float32)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in a.shape), indexing="ij")
    field = np.exp(strength * (i + j + k) / 3.0).astype(np.float32)
    if a.min() < 0:  # QSM: a smooth background-field residue inside its mask, not a gain
        return vol.with_array(np.where(a != 0, a + 0.02 * (i + j + k).astype(np.float32) / 3.0,
                                       0.0).astype(np.float32))
    return vol.with_array(a * field)


def noise_change(vol, fraction: float = 0.03, seed: int = 7):
    """Rician noise of ``fraction`` x the median magnitude (Gaussian for QSM)."""
    a = vol.array.astype(np.float32)
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.median(np.abs(a[a != 0])))
    if a.min() < 0:
        return vol.with_array(np.where(a != 0, a + rng.normal(0, sigma, a.shape), 0.0)
                              .astype(np.float32))
    n1, n2 = (rng.normal(0, sigma, a.shape).astype(np.float32) for _ in range(2))
    return vol.with_array(np.sqrt((a + n1) ** 2 + n2 ** 2))


CHANGES = {"gamma 0.7": lambda v: gamma_change(v, 0.7), "gamma 1.4": lambda v: gamma_change(v, 1.4),
           "bias field": bias_change, "more noise": noise_change}


def unmatched(a: list, b: list) -> int:
    """Lesions of ``a`` with no lesion of ``b`` within ``MATCH_MM``."""
    if not a:
        return 0
    if not b:
        return len(a)
    pa = np.array([x.centroid_ras for x in a])
    pb = np.array([x.centroid_ras for x in b])
    d = np.linalg.norm(pa[:, None] - pb[None], axis=2)
    return int((d.min(1) > MATCH_MM).sum())


def lesion_changes(subject, modality: str, bundle) -> dict:
    """For each change: (lesions of the original, lost, gained)."""
    from CMBDetectorLib.engine.detection import default_settings, detect

    settings = default_settings(bundle, device="cpu")
    vol = subject.images[modality]
    ref = detect(vol, modality, None, settings, bundle).lesions()
    out = {}
    for name, change in CHANGES.items():
        got = detect(change(vol), modality, None, settings, bundle).lesions()
        out[name] = (len(ref), unmatched(ref, got), unmatched(got, ref))
    return out


@pytest.fixture(scope="module")
def subject():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    return simulate_subject(3_200_500, SimulationConfig(roi_mm=96.0, n_cmbs=8,
                                                        cmb_size_prior="real"))


@pytest.fixture(scope="module")
def bundled():
    from CMBDetectorLib.engine.models import load_bundle

    return load_bundle(device="cpu")


#: Measured 2026-12-05: the v15 models (percentile normalisation) lost or gained 2 of 5 SWI
#: lesions under a +-25 % bias field; v20 (iqr) moved 4 of 6 QSM lesions under gamma 0.7. The
#: bundled v21 models keep every GRE (4) and SWI (3) lesion under all four changes and lose 1 of
#: 5 QSM lesions under gamma 0.7.
@pytest.mark.parametrize("modality", ["gre", "swi", "qsm"])
def test_changes_of_intensity_bias_and_noise_keep_the_lesions(subject, bundled, modality):
    changes = lesion_changes(subject, modality, bundled)
    n_ref = changes["gamma 0.7"][0]
    assert n_ref >= 3, f"the subject shows only {n_ref} lesions on {modality}"
    for name, (n, lost, gained) in changes.items():
        assert lost + gained <= max(1, n // 4), (name, n, lost, gained)
