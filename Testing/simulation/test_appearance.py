"""Appearance variants (issue 25, ``simulation.appearance``): each variant does what its name
says, the defaults leave the simulator's output untouched, and "random" is reproducible.

Why: the variants exist so that a model trained on simulated scans meets other scanners'
weighting and other vendors' SWI/QSM processing; a variant that silently does nothing (or
changes the default subjects) would defeat that without any image looking wrong.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from CMBDetectorLib.simulation import appearance as ap  # noqa: E402

B0 = (0.0, 0.0, 1.0)  # B0 along the grid's k axis in the phantoms below


def _sphere(n=64, radius=4.0, chi=1.0):
    idx = np.indices((n, n, n)) - n // 2
    r = np.sqrt((idx ** 2).sum(0))
    ang = np.degrees(np.arccos(np.abs(idx[2]) / np.maximum(r, 1e-9)))  # angle to B0
    return (r <= radius).astype(np.float32) * chi, r, ang


# ------------------------------------------------------------------------------------------
# QSM reconstruction families (pure functions on a simulated sphere field)
def test_tkd_streaks_lie_on_the_magic_angle_cone_and_keep_the_sphere_chi():
    chi, r, ang = _sphere()
    field = ap.forward_field(chi, (1.0, 1.0, 1.0), B0)
    rec = ap.tkd(field, (1.0, 1.0, 1.0), B0, threshold=0.15)
    inside = r <= 3.0
    assert abs(rec[inside].mean() - 1.0) < 0.2  # close to the true chi inside
    err2 = rec ** 2  # outside, the true chi is 0: everything is artefact
    shell = (r > 8) & (r < 28)
    # the truncated k-space cone (54.7 deg from B0) maps to image-space streaks on its normal
    # cone: 35.3 deg from B0, i.e. the magic angle measured from the transverse plane
    on_cone = err2[shell & (np.abs(ang - 35.3) < 6)].mean()
    off_cone = err2[shell & (ang > 60)].mean()
    assert on_cone > 10 * off_cone
    # streaks come from the source: the error near the sphere exceeds that far from it
    assert err2[(r > 6) & (r < 12)].mean() > 5 * err2[(r > 20) & (r < 28)].mean()
    # the inside error is small relative to chi, the outside streaks are not negligible
    assert np.abs(rec[inside] - 1.0).mean() < 0.2 < 100 * np.sqrt(on_cone)


def test_tikhonov_smooths_and_underestimates_more_with_larger_lambda():
    chi, r, _ = _sphere()
    field = ap.forward_field(chi, (1.0, 1.0, 1.0), B0)
    inside = r <= 3.0
    means = [ap.tikhonov(field, (1.0, 1.0, 1.0), B0, lam)[inside].mean()
             for lam in (0.01, 0.03, 0.1)]
    assert means[0] < 0.9 and means[0] > means[1] > means[2] > 0.2
    tkd_rec = ap.tkd(field, (1.0, 1.0, 1.0), B0, 0.15)
    assert ap.tikhonov(field, (1.0, 1.0, 1.0), B0, 0.03)[inside].mean() < tkd_rec[inside].mean()


def test_qsm_stage_variants_come_from_the_simulated_field():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, run_stages

    cfg = dict(roi_mm=24.0, roi_center_mni=(30.0, -20.0, 30.0), spacing_mm=(1.0, 1.0, 1.0),
               te_ms=20.0, b0_t=3.0, oblique_deg=0.0, flip_axes=False, deform=False,
               veins=False, calcifications=False, iron=False, air=False, noise=False,
               bias=False, cmb_specs=[dict(centre_ras=(30.0, -20.0, 30.0), radius_mm=1.5,
                                           chi_ppm=0.8)])
    cur = run_stages(2, SimulationConfig(**cfg))
    tkd = run_stages(2, SimulationConfig(qsm_recon="tkd", **cfg))
    tik = run_stages(2, SimulationConfig(qsm_recon="tikhonov", qsm_offset_ppm=0.05,
                                         qsm_scale=0.5, **cfg))
    c = tuple(np.round(cur.T.to_ijk(np.array([[30.0, -20.0, 30.0]]))[0]).astype(int))
    assert tkd.qsm[c] > 0.3 and tkd.params["appearance"]["qsm"]["recon"] == "tkd"
    assert 0.1 <= tkd.params["appearance"]["qsm"]["threshold"] <= 0.2
    assert not np.allclose(tkd.qsm, cur.qsm, atol=1e-3)
    brain = cur.qsm != 0
    assert np.median(tik.qsm[brain]) == pytest.approx(0.05, abs=0.01)  # the offset
    assert 0.05 < tik.qsm[c] - 0.05 < 0.5 * tkd.qsm[c]  # scaled by 0.5, Tikhonov-shrunk
    # the other images and the labels are the default ones
    for name in ("gre", "swi", "cmb_lab", "mim_lab"):
        assert np.array_equal(getattr(tkd, name), getattr(cur, name))


# ------------------------------------------------------------------------------------------
# GRE weighting
@pytest.fixture(scope="module")
def ventricles():
    """CSF/WM magnitude ratio of a noise-free ROI with lateral ventricles, by weighting."""
    from CMBDetectorLib.simulation.simulator import SimulationConfig, run_stages

    def run(weighting, seed=0, b0=3.0):
        from CMBDetectorLib.simulation import simulator as sim

        cfg = SimulationConfig(roi_mm=40.0, roi_center_mni=(0.0, -5.0, 15.0),
                               spacing_mm=(1.5, 1.5, 1.5), te_ms=20.0, b0_t=b0,
                               oblique_deg=0.0, flip_axes=False, deform=False, veins=False,
                               calcifications=False, iron=False, air=False, noise=False,
                               bias=False, n_cmbs=0, gre_weighting=weighting)
        st = run_stages(seed, cfg, until="field")
        csf, wm = sim._to_target(st, st.an["csf"]), sim._to_target(st, st.an["wm"])
        sim.stage_signal(st, cfg.block("signal"))
        mag = np.abs(st.sig)
        return float(np.median(mag[csf > 0.9]) / np.median(mag[wm > 0.9]))

    return run


def test_gre_weighting_csf_bright_in_2d_long_tr_and_dark_in_3d_short_tr(ventricles):
    assert ventricles("t2star") > 1.2  # today's look: fully relaxed, CSF bright
    for seed, b0 in ((0, 3.0), (1, 1.5), (2, 3.0)):
        assert ventricles("2d_long_tr", seed, b0) > 1.0
        assert ventricles("3d_spoiled", seed, b0) < 1.0


def test_steady_state_factor_saturates_long_t1_at_short_tr():
    f = ap.spoiled_gre_factor(np.array([900.0, 4200.0]), 30.0, 15.0)
    assert f[1] < 0.5 * f[0]  # CSF saturated against WM
    g = ap.spoiled_gre_factor(np.array([900.0, 4200.0]), 3000.0, 20.0)
    assert g[1] / g[0] > 0.6  # long TR: close to proton density


# ------------------------------------------------------------------------------------------
# SWI processing
def _vein_signal(n=48, spacing=(0.5, 0.5, 1.0), radius_mm=1.0, phase_rad=-1.2):
    """A vein along B0 (negative phase inside, none outside) in a smooth background phase."""
    idx = np.indices((n, n, n)).astype(np.float32)
    x = (idx[0] - n / 2) * spacing[0]
    y = (idx[1] - n / 2) * spacing[1]
    inside = x * x + y * y <= radius_mm ** 2
    bg = 0.8 * np.sin(idx[0] / n * np.pi) * np.cos(idx[2] / n * np.pi)  # slow background
    sig = (np.exp(1j * (bg + np.where(inside, phase_rad, 0.0)))).astype(np.complex64)
    return sig, inside


@pytest.mark.parametrize("kind", ["gaussian", "hann"])
def test_homodyne_width_changes_vein_contrast_monotonically(kind):
    sp = (0.5, 0.5, 1.0)
    sig, vein = _vein_signal(spacing=sp)
    ring = np.zeros_like(vein)
    ring[16:32, 16:32] = True
    ring &= ~vein
    lowpass = ap.gaussian_lowpass if kind == "gaussian" else ap.hann_lowpass
    contrast = []
    for width in (0.5, 1.0, 2.0, 4.0):  # up to where the vein's phase is kept whole
        _, swi = ap.swi_image(sig, lowpass(sig, sp, width), power=4)
        contrast.append(1.0 - swi[vein].mean() / swi[ring].mean())
    # a wider low-pass removes less of the vein's own phase: the vein gets darker
    assert all(b > a + 0.005 for a, b in zip(contrast, contrast[1:])), contrast
    assert contrast[-1] > contrast[0] + 0.3


def test_mask_power_and_mask_sign():
    phase = np.linspace(-3.0, 3.0, 101).astype(np.float32).reshape(101, 1, 1)
    sig = np.exp(1j * phase).astype(np.complex64)
    lp = np.ones_like(sig)
    s2 = ap.swi_image(sig, lp, 2)[1].ravel()
    s6 = ap.swi_image(sig, lp, 6)[1].ravel()
    neg = phase.ravel() < -1e-6
    assert np.all(s6[neg] < s2[neg]) and np.all(s6[~neg] == s2[~neg])
    pos = ap.swi_image(sig, lp, 4, mask="positive")[1].ravel()
    both = ap.swi_image(sig, lp, 4, mask="both")[1].ravel()
    assert np.allclose(pos[neg], 1.0, atol=1e-6) and np.all(pos[phase.ravel() > 1e-3] < 0.999)
    assert np.allclose(both, both[::-1], atol=1e-5) and both[50] == pytest.approx(1.0)


def test_mip_takes_the_minimum_over_neighbouring_slices():
    img = np.ones((4, 4, 9), np.float32)
    img[1, 1, 4] = 0.2
    out = ap.min_intensity_projection(img, 3)
    assert np.all(out[1, 1, 3:6] == pytest.approx(0.2)) and out[1, 1, 2] == 1
    assert ap.min_intensity_projection(img, 0) is img


# ------------------------------------------------------------------------------------------
# acquisition
def test_gfactor_noise_std_follows_the_g_map():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, run_stages

    kw = dict(roi_mm=48.0, roi_center_mni=(30.0, -20.0, 30.0), spacing_mm=(1.0, 1.0, 1.0),
              te_ms=20.0, b0_t=3.0, snr=40.0, oblique_deg=0.0, flip_axes=False, deform=False,
              veins=False, calcifications=False, iron=False, air=False, bias=False, n_cmbs=0,
              gfactor=1.5)
    quiet = run_stages(6, SimulationConfig(noise=False, **kw), until="acquisition")
    noisy = run_stages(6, SimulationConfig(noise=True, **kw), until="acquisition")
    d = (noisy.sig - quiet.sig).real
    g = ap.gfactor_map(quiet.shape, 1.5, ap.family_rng(6, "gfactor"))
    sd = SimulationConfig().scale / 40.0
    assert g.min() == pytest.approx(1.0) and g.max() == pytest.approx(2.5)
    assert np.std(d / g) == pytest.approx(sd, rel=0.03)
    lo, hi = g < 1.3, g > 2.1
    assert lo.sum() > 1000 and hi.sum() > 1000
    ratio = np.std(d[hi]) / np.std(d[lo])
    assert ratio == pytest.approx(g[hi].mean() / g[lo].mean(), rel=0.1) and ratio > 1.5


def test_gibbs_rings_next_to_a_step_edge():
    img = np.zeros((64, 64, 2), np.float32)
    img[20:44] = 1.0  # two step edges along axis 0
    assert ap.gibbs_truncate(img, 0.0) is img
    out = ap.gibbs_truncate(img, 0.3)
    prof = out[:, 32, 0]
    assert prof.max() > 1.05 and prof.min() < -0.05  # over- and undershoot
    assert np.abs(prof[22:42] - 1).max() > 0.02  # ripples next to the edges, inside the step
    assert np.abs(out[:, 32, 0] - out[:, 10, 0]).max() < 1e-5  # nothing along the edge


def test_ghost_replicates_at_half_the_field_of_view():
    img = np.zeros((32, 32, 2), np.complex64)
    img[4:8, 10:14] = 1.0
    out = ap.ghost(img, 0.05, axis=1, kind="nyquist")
    assert np.abs(out[4:8, 26:30]).mean() == pytest.approx(0.05, rel=1e-3)
    assert np.abs(out[4:8, 10:14]).mean() == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------------------------------
# training-time intensity transform
def test_intensity_augment_is_monotone_and_respects_the_gamma_range():
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 100.0, (16, 16, 16)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[2:14, 2:14, 2:14] = True
    gammas = []
    for seed in range(40):
        out = ap.intensity_augment(img, mask, np.random.default_rng(seed))
        o = np.argsort(img[mask], kind="stable")
        assert np.all(np.diff(out[mask][o]) >= 0)  # rank order kept
        assert out[mask].min() == pytest.approx(img[mask].min(), rel=1e-5)
        assert out[mask].max() == pytest.approx(img[mask].max(), rel=1e-4)
        # gamma alone (no warp): recover it from one voxel
        g_out = ap.intensity_augment(img, mask, np.random.default_rng(seed), warp=0.0)
        lo, hi = img[mask].min(), img[mask].max()
        x = (img[mask] - lo) / (hi - lo)
        y = (g_out[mask] - lo) / (hi - lo)
        sel = (x > 0.2) & (x < 0.8)
        gammas.append(float(np.median(np.log(y[sel]) / np.log(x[sel]))))
    assert 0.7 - 1e-3 <= min(gammas) and max(gammas) <= 1.4 + 1e-3
    assert min(gammas) < 0.85 and max(gammas) > 1.25  # the range is used


# ------------------------------------------------------------------------------------------
# defaults and "random" in the simulator
@pytest.fixture(scope="module")
def subjects():
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    base = dict(roi_mm=48.0, n_cmbs=2, roi_center_mni=(20.0, -20.0, 20.0))
    return dict(default=simulate_subject(5, SimulationConfig(**base)),
                explicit=simulate_subject(5, SimulationConfig(**base, **{
                    "gre_weighting": "t2star", "gfactor": 0.0, "bias_strength": 1.0,
                    "gibbs": 0.0, "ghosting": 0.0, "texture": 0.0, "swi_filter": "gaussian",
                    "swi_mask": "negative", "swi_mip": 0, "qsm_recon": "current",
                    "qsm_background": 0.0, "qsm_scale": 1.0, "qsm_offset_ppm": 0.0})),
                random=simulate_subject(5, SimulationConfig(**base, **ap.RANDOM_APPEARANCE)),
                random_again=simulate_subject(5, SimulationConfig(**base,
                                                                  **ap.RANDOM_APPEARANCE)),
                random_other=simulate_subject(6, SimulationConfig(**base,
                                                                  **ap.RANDOM_APPEARANCE)))


def test_explicit_defaults_are_the_default_subject(subjects):
    a, b = subjects["default"], subjects["explicit"]
    for m in ("gre", "swi", "qsm"):
        assert np.array_equal(a.images[m].array, b.images[m].array)
    assert a.truth == b.truth


def test_random_appearance_keeps_the_main_stream_and_is_reproducible(subjects):
    d, r, r2, o = (subjects[k] for k in ("default", "random", "random_again", "random_other"))
    # the same anatomy, lesions and labels: appearance draws never touch the main stream
    def lesions(s):  # the SWI footprint depends on the SWI variant, the rest must not
        return [{k: v for k, v in c.items() if k != "swi_visible_diameter_mm"}
                for c in s.truth["cmbs"]]

    assert lesions(r) == lesions(d) and r.truth["mimics"] == d.truth["mimics"]
    assert np.array_equal(r.cmb_labels.array, d.cmb_labels.array)
    assert np.array_equal(r.mimic_labels.array, d.mimic_labels.array)
    for m in ("gre", "swi", "qsm"):
        assert np.array_equal(r.images[m].array, r2.images[m].array)  # same seed, same image
        assert not np.array_equal(r.images[m].array, d.images[m].array)
    assert o.truth["cmbs"] != r.truth["cmbs"]
    assert not np.array_equal(o.images["gre"].array[:4], r.images["gre"].array[:4])


def test_random_draws_differ_between_seeds_and_name_a_known_variant():
    seen = {"gre": set(), "swi": set(), "qsm": set()}
    for seed in range(12):
        p = ap.draw_gre_weighting("random", 3.0, ap.family_rng(seed, "gre_weighting"))
        seen["gre"].add(p["variant"])
        s = ap.draw_swi("random", "random", "random", 3.0, 4, lambda k: ap.family_rng(seed, k))
        assert 2 <= s["power"] <= 6 and 1.5 <= s["sigma_mm"] <= 6.0 and s["mip"] in (0, 2, 3, 4)
        seen["swi"].add((s["filter"], s["mask"]))
        q = ap.draw_qsm(dict(ap.QSM_DEFAULTS, qsm_recon="random"),
                        lambda k: ap.family_rng(seed, k))
        seen["qsm"].add(q["recon"])
    assert seen["gre"] == set(ap.GRE_WEIGHTINGS) and seen["qsm"] == set(ap.QSM_RECONS)
    assert len(seen["swi"]) >= 4
    with pytest.raises(ValueError):
        ap.draw_gre_weighting("flash", 3.0, ap.family_rng(0, "gre_weighting"))


def test_random_appearance_keeps_the_frozen_stream():
    """The frozen draws of test_simulation_stages.test_random_stream_order_is_frozen hold with
    every appearance knob random: appearance never draws from the main stream."""
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    s = simulate_subject(7, SimulationConfig(roi_mm=30.0, n_cmbs=2, **ap.RANDOM_APPEARANCE))
    p = s.truth["params"]
    assert (p["TE_ms"], p["B0_T"], p["snr"]) == (30.627, 3.0, 35.51)
    got = [(np.round(c["centre_ras"], 1).tolist(), c["chi_ppm"], c["radius_mm"])
           for c in s.truth["cmbs"]]
    assert got == [([-25.0, -56.4, -0.4], 0.4516, 2.1455), ([-14.7, -65.0, -3.4], 0.5225, 1.2353)]
    assert [m["type"] for m in s.truth["mimics"]] == ["vein"] * 6


def test_swi_filter_width_is_drawn_even_when_the_filter_family_is_fixed():
    """Domain data fixes the filter family per subject; the width must still vary (it was
    3 mm for every domain subject until 2026-12-05)."""
    def draw(seed, family, width):
        return ap.draw_swi(family, "negative", 0, 3.0, 4, lambda k: ap.family_rng(seed, k),
                           width)

    widths = [draw(seed, "gaussian", "random")["sigma_mm"] for seed in range(20)]
    assert all(1.5 <= w <= 6.0 for w in widths) and np.ptp(widths) > 2.0
    assert draw(3, "hann", "random")["sigma_mm"] == draw(3, "gaussian", "random")["sigma_mm"]
    assert draw(3, "gaussian", None)["sigma_mm"] == 3.0      # the default: homodyne_sigma_mm
    assert draw(3, "hann", 4.5)["sigma_mm"] == 4.5
    with pytest.raises(ValueError, match="swi_filter_width"):
        draw(3, "gaussian", -1.0)


def test_domains_draw_the_swi_filter_width():
    from CMBDetectorLib.simulation import domains as D

    for split in ("train", "cross_domain"):
        dom = D.draw_domain(D.split_seeds(split, 1)[0], split, anatomies=["robex_ref"])
        assert dom["swi_filter_width"] == "random"
