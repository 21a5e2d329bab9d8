"""One check per simulator stage (``simulation.PIPELINE``), on small regions of interest.

Why: the simulator is a chain of stages sharing a state; each test stops the chain after its
stage (``run_stages(..., until=...)``) and checks what that stage alone is responsible for, so
a broken variant of one stage fails here by name rather than as a vague image difference.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest.importorskip("nilearn")
pytest.importorskip("nibabel")

from CMBDetectorLib.simulation import simulator as sim  # noqa: E402
from CMBDetectorLib.simulation.simulator import (PIPELINE, STAGE_BORROWS, STAGE_FIELDS,  # noqa: E402
                                       SimulationConfig, config_to_dict, run_stages)

CENTRE = (30.0, -20.0, 30.0)  # MNI mm, parietal white matter
ROOT = Path(__file__).resolve().parents[2]


def clean(**kw):
    """Noise-free, mimic-free, undeformed, axis-aligned ROI: subject RAS == template MNI."""
    base = dict(roi_mm=24.0, roi_center_mni=CENTRE, spacing_mm=(1.0, 1.0, 1.0), te_ms=20.0,
                b0_t=3.0, oblique_deg=0.0, flip_axes=False, deform=False, veins=False,
                calcifications=False, iron=False, air=False, noise=False, bias=False, n_cmbs=0)
    base.update(kw)
    return SimulationConfig(**base)


def t_index(st, ras):
    """Nearest target-grid (i, j, k) index of a RAS point."""
    return tuple(np.round(st.T.to_ijk(np.asarray(ras, float)[None])[0]).astype(int))


#: the SimulationConfig fields in their historical order: config_to_dict (training configs,
#: docs/experiments/*.json) must keep exactly these keys
CONFIG_KEYS = ["roi_mm", "roi_center_mni", "spacing_mm", "min_voxel_mm3", "te_ms", "b0_t",
               "b0_dir", "oblique_deg", "flip_axes", "deform", "deform_mm", "n_cmbs",
               "cmb_specs", "calc_specs", "cmb_radius_mm", "cmb_chi_ppm", "cmb_dark_context",
               "min_visible_diameter_mm", "veins", "vein_density", "calcifications", "iron",
               "air", "noise", "bias", "snr", "fine_mm", "field_min_mm", "margin_mm",
               "homodyne_sigma_mm", "swi_power", "qsm_blur_vox", "scale"]


# ------------------------------------------------------------------------------------------
# configuration blocks
def test_stage_fields_cover_every_config_field_exactly_once():
    names = [f.name for f in dataclasses.fields(SimulationConfig)]
    owned = [n for fields in STAGE_FIELDS.values() for n in fields]
    assert sorted(owned) == sorted(names)
    assert len(owned) == len(set(owned)), [n for n in owned if owned.count(n) > 1]
    assert list(STAGE_FIELDS) == [name for name, _ in PIPELINE]
    for stage, fields in STAGE_BORROWS.items():
        assert stage in STAGE_FIELDS
        for f in fields:
            assert f in names and f not in STAGE_FIELDS[stage]


def test_config_stays_flat_and_blocks_hide_other_stages_fields():
    # the historical keys keep their order; issue-25 knobs are only appended after them
    assert list(config_to_dict(SimulationConfig()))[:len(CONFIG_KEYS)] == CONFIG_KEYS
    cfg = SimulationConfig(te_ms=25.0, swi_power=3, n_cmbs=(2, 4))  # flat keywords as before
    swi = cfg.block("swi")
    assert (swi.swi_power, swi.homodyne_sigma_mm) == (3, 3.0)
    with pytest.raises(AttributeError):
        swi.te_ms  # noqa: B018  (a protocol field)
    assert cfg.block("cmbs").swi_power == 3  # borrowed for dark-context placement
    assert vars(cfg.block("truth")) == {}
    # the overrides that experiments and training configs pass still construct a config
    # (the config files only: vNN_*.json and vNN/config*.json, not manifests or run logs)
    built = 0
    exp = ROOT / "docs" / "experiments"
    for path in sorted(exp.glob("*.json")) + sorted(exp.glob("*/config*.json")):
        d = json.loads(path.read_text())
        for key in ("sim_config", "detector_sim_config"):
            if isinstance(d.get(key), dict) and d[key]:
                SimulationConfig(**d[key])
                built += 1
    assert built  # v32's detector_sim_config at least
    with pytest.raises(ValueError):
        run_stages(0, clean(), until="no_such_stage")


def test_random_stream_order_is_frozen():
    """The stages draw in the order the one-function simulator did: a reordering changes every
    seed's subject (training pools, the demo scan, experiments), so it must be deliberate."""
    s = sim.simulate_subject(7, SimulationConfig(roi_mm=30.0, n_cmbs=2))
    p = s.truth["params"]
    assert (p["TE_ms"], p["B0_T"], p["snr"]) == (30.627, 3.0, 35.51)
    assert p["spacing"] == pytest.approx([0.876627, 0.876627, 1.140497], abs=1e-6)
    got = [(np.round(c["centre_ras"], 1).tolist(), c["chi_ppm"], c["radius_mm"])
           for c in s.truth["cmbs"]]
    assert got == [([-25.0, -56.4, -0.4], 0.4516, 2.1455), ([-14.7, -65.0, -3.4], 0.5225, 1.2353)]
    assert [m["type"] for m in s.truth["mimics"]] == ["vein"] * 6
    assert list(p)[:3] == ["seed", "TE_ms", "B0_T"] and list(p)[-1] == "simulator"


# ------------------------------------------------------------------------------------------
# one test per stage
def test_protocol_draws_within_ranges_and_sets_phase_per_ppm():
    for seed in range(4):
        st = run_stages(seed, SimulationConfig(roi_mm=20.0), until="protocol")
        assert 15 <= st.te <= 40 and st.b0 in (1.5, 3.0) and 25 <= st.snr <= 60
        assert np.prod(st.spacing) >= SimulationConfig().min_voxel_mm3
        assert st.T is None  # nothing past the protocol ran
    st = run_stages(0, clean(te_ms=20.0, b0_t=3.0), until="protocol")
    assert st.phase_per_ppm == pytest.approx(2 * np.pi * 42.577478e6 * 3.0 * 20e-3 * 1e-6)


def test_geometry_target_grid_covers_the_roi_inside_the_field_grid():
    cfg = SimulationConfig(roi_mm=(30.0, 24.0, 20.0), roi_center_mni=CENTRE,
                           spacing_mm=(0.6, 0.6, 2.0), oblique_deg=20.0, flip_axes=True)
    st = run_stages(5, cfg, until="geometry")
    assert np.allclose(st.T.direction.T @ st.T.direction, np.eye(3), atol=1e-9)
    assert np.allclose(st.T.shape * st.spacing, (30.0, 24.0, 20.0), atol=2.0)
    assert np.all(st.F.spacing >= 1.0) and not st.same
    # every corner of T lies inside F with at least the margin (12 mm) minus half a voxel
    corners = np.array([[i, j, k] for i in (0, st.T.shape[0] - 1) for j in (0, st.T.shape[1] - 1)
                        for k in (0, st.T.shape[2] - 1)])
    f_ijk = st.F.to_ijk(st.T.to_ras(corners))
    margin_vox = 12.0 / st.F.spacing - 1.0
    assert np.all(f_ijk >= margin_vox) and np.all(f_ijk <= np.array(st.F.shape) - 1 - margin_vox)
    assert st.cmb_lab.shape == st.mim_lab.shape == tuple(st.T.shape)


def test_iron_stage_draws_each_nucleus_within_its_range_mirrored():
    from CMBDetectorLib.simulation.anatomy import NUCLEI

    assert run_stages(1, clean(iron=False), until="iron").nuc_info == {}
    st = run_stages(1, clean(iron=True), until="iron")
    assert len(st.iron_values) == len(NUCLEI) and len(st.nuc_info) == 2 * len(NUCLEI)
    for name, (lab, cen, _, (lo, hi), _) in NUCLEI.items():
        assert st.iron_chi[lab] == st.iron_chi[lab + 1]
        assert lo - 1e-6 <= st.iron_chi[lab] <= hi + 1e-6
        assert st.nuc_info[lab][1][0] == -st.nuc_info[lab + 1][1][0] == cen[0]


def test_anatomy_fractions_partition_each_voxel():
    # near the vertex: brain, CSF, skull, scalp and air all in the field grid
    st = run_stages(3, clean(roi_mm=30.0, roi_center_mni=(30.0, -20.0, 62.0), air=True),
                    until="anatomy")
    an = st.an
    for k in ("gm", "wm", "csf", "brain", "bone", "scalp", "air", "sinus"):
        assert an[k].min() >= 0 and an[k].max() <= 1 + 1e-6, k
    total = an["gm"] + an["wm"] + an["csf"] + an["bone"] + an["scalp"] + an["air"]
    assert np.allclose(total, 1.0, atol=1e-5)
    assert np.all(an["gm"] + an["wm"] <= an["brain"] + 1e-6)
    assert an["air"].max() > 0.99 and an["bone"].max() > 0.99 and (an["brain"] > 0.5).mean() > 0.2


def test_holes_inside_the_brain_hull_hold_csf_not_air():
    # the cisterns around the midbrain: non-brain voxels inside the closed hull. Air there (M0 ~0,
    # -9.4 ppm) drew a dark, blooming shell around every fissure and cistern on GRE and SWI.
    st = run_stages(3, clean(roi_mm=24.0, roi_center_mni=(-7.0, -5.0, -25.0), air=True),
                    until="anatomy")
    an, tpl = st.an, st.tpl
    # undeformed: each field voxel's template voxel, and whether it is such a hole there
    ijk = np.indices(st.F.shape).reshape(3, -1).T
    t = np.round(tpl.to_index(st.F.to_ras(ijk))).astype(int)
    assert np.all((t >= 0) & (t < np.array(tpl.brain.shape)))
    t = tuple(t.T)
    hole = ((tpl.d_out[t] == 0) & (tpl.brain[t] < 0.5)).reshape(st.F.shape)
    assert hole.mean() > 0.02  # the ROI does hold such holes
    assert an["air"][an["brain"] > 0.01].max() < 1e-3
    near = an["brain"] > 0.01
    assert np.allclose((an["gm"] + an["wm"] + an["csf"])[near], 1.0, atol=1e-4)
    # a QSM pipeline's hole-filled mask keeps them: the QSM support covers the holes
    assert (an["hull"][hole] > 0.5).mean() > 0.9
    assert np.all(an["hull"] >= an["brain"] - 1e-6) and (an["hull"] < 0.5).mean() > 0.05


def test_tissue_relaxation_scales_with_field_strength():
    lo = run_stages(2, clean(b0_t=1.5), until="tissue")
    hi = run_stages(2, clean(b0_t=3.0), until="tissue")
    # same seed, same jitter draws: R2* of GM/WM scales with 0.55 + 0.15 B0
    ratio = (0.55 + 0.15 * 3.0) / (0.55 + 0.15 * 1.5)
    assert hi.r2s["wm"] == pytest.approx(ratio * lo.r2s["wm"])
    assert -2.4 <= hi.chi_bone <= -1.6
    brain = hi.an["brain"] > 0.9
    assert np.all(hi.r2_map[brain] > 0) and np.all(hi.r2_map[brain] >= lo.r2_map[brain] - 1e-4)
    assert hi.r2_map[brain].mean() > 1.2 * lo.r2_map[brain].mean()
    assert np.all(np.abs(hi.chi_w[brain]) < 0.05)  # tissue vs water: a few hundredths of a ppm


def test_veins_stage_rasterises_labelled_paramagnetic_tubes():
    kw = dict(roi_mm=40.0, roi_center_mni=(25.0, -15.0, 25.0))
    none = run_stages(11, clean(**kw), until="veins")
    st = run_stages(11, clean(veins=True, **kw), until="veins")
    assert not none.vein_frac.any() and none.mimics == []
    veins = [m for m in st.mimics if m["type"] == "vein"]
    assert len(veins) >= 3 and [m["id"] for m in st.mimics] == list(range(1, st.next_id))
    assert 0 <= st.vein_frac.min() and st.vein_frac.max() <= 1
    labelled = st.vein_id > 0
    assert np.all(st.vein_frac[labelled] > 0.3)
    assert set(np.unique(st.vein_id[labelled]).tolist()) <= {m["id"] for m in veins}
    # the veins' chi is added to the tissue's: paramagnetic, by volume fraction
    added = st.chi_w - none.chi_w
    assert np.all(added >= -1e-6)
    assert np.allclose(added[labelled], st.vein_frac[labelled] * st.vein_chi_map[labelled],
                       atol=1e-5)


def test_air_stage_gives_tissue_its_susceptibility_relative_to_air():
    kw = dict(roi_mm=30.0, roi_center_mni=(30.0, -20.0, 62.0))
    assert run_stages(3, clean(**kw), until="air").chi_bg is None
    st = run_stages(3, clean(air=True, **kw), until="air")
    assert st.air
    deep = st.an["brain"] > 0.999
    outside = st.an["air"] > 0.999
    assert np.median(st.chi_bg[deep]) == pytest.approx(sim.CHI_TISSUE_VS_AIR, abs=0.05)
    assert np.median(st.chi_bg[outside]) == pytest.approx(0.0, abs=0.05)


def test_field_stage_gives_a_dipole_with_the_sign_flip_along_b0():
    st = run_stages(0, clean(), until="air")
    c = np.array(st.F.shape) // 2
    base = st.chi_w.copy()
    idx = np.indices(st.F.shape)
    r_mm = np.sqrt(sum(((idx[a] - c[a]) * st.F.spacing[a]) ** 2 for a in range(3)))
    sphere = np.zeros_like(base)
    sphere[r_mm <= 3.0] = 1.0  # 1 ppm, 3 mm radius
    fields = []
    for chi in (base, base + sphere):
        st.chi_w, st.chi_bg = chi, None
        sim.stage_field(st, SimulationConfig().block("field"))
        fields.append(st.field_ppm)
    d = fields[1] - fields[0]  # the sphere's own field (linear in chi)
    b = st.T.direction.T @ np.array([0.0, 0.0, 1.0])  # B0 in the grid frame (axis k here)
    k_axis = int(np.argmax(np.abs(b)))
    step = np.zeros(3, int)
    step[k_axis] = 6  # 6 mm from the centre: outside the sphere
    perp = np.roll(step, 1)
    poles = [d[tuple(c + s)] for s in (step, -step)]
    equator = [d[tuple(c + s)] for s in (perp, -perp)]
    expected_pole = 2 * 1.0 * 3.0 ** 3 / 3 / 6.0 ** 3  # chi a^3/3 * 2/r^3
    for v in poles:
        assert v == pytest.approx(expected_pole, rel=0.25)
    for v in equator:
        assert v == pytest.approx(-expected_pole / 2, rel=0.25)


def test_signal_decays_with_te_by_the_tissue_r2star():
    s10 = run_stages(4, clean(te_ms=10.0), until="signal")
    s40 = run_stages(4, clean(te_ms=40.0), until="signal")
    assert s10.sig.dtype == np.complex64 and s10.an is None  # field-grid arrays dropped
    brain = s10.brain_t > 0.5
    ratio = np.abs(s40.sig[brain]) / np.abs(s10.sig[brain])
    assert np.all(ratio < 1.0)
    # the ROI is mostly white matter: the median decay is WM's R2* over 30 ms
    assert np.median(ratio) == pytest.approx(math.exp(-30e-3 * s10.r2s["wm"]), rel=0.05)


def test_cmbs_stage_places_every_cmb_inside_the_brain_and_labels_it():
    cfg = clean(roi_mm=50.0, roi_center_mni=(20.0, -10.0, 20.0), n_cmbs=5, deform=True,
                oblique_deg=15.0)
    st = run_stages(21, cfg, until="cmbs")
    assert len(st.cmbs) == 5 and st.sig_free is not None
    centres = np.array([c["centre_ras"] for c in st.cmbs])
    for i, c in enumerate(st.cmbs):
        ijk = t_index(st, c["centre_ras"])
        assert st.brain_t[ijk] > 0.5
        assert st.cmb_lab[ijk] == c["id"] == i + 1
        assert st.chi_t[ijk] > 0.1  # its own chi in the QSM truth
        assert abs(st.sig[ijk]) < 0.5 * abs(st.sig_free[ijk])  # dark against lesion-free
        others = np.delete(centres, i, axis=0)
        assert np.linalg.norm(others - centres[i], axis=1).min() >= 8.0


def test_calcification_stage_adds_diamagnetic_labelled_mimics():
    inside, outside = (CENTRE[0] + 5, CENTRE[1], CENTRE[2]), (CENTRE[0] + 80, CENTRE[1], CENTRE[2])
    specs = [dict(centre_ras=inside, radius_mm=1.2, chi_ppm=-2.0),
             dict(centre_ras=outside, radius_mm=1.2, chi_ppm=-2.0)]  # outside the ROI: skipped
    before = run_stages(5, clean(), until="cmbs")
    st = run_stages(5, clean(calc_specs=specs), until="calcifications")
    assert [m["type"] for m in st.mimics] == ["calcification"]
    ijk = t_index(st, inside)
    assert st.mim_lab[ijk] == st.mimics[0]["id"]
    assert st.chi_t[ijk] < -1.0
    assert abs(st.sig[ijk]) < 0.5 * abs(before.sig[ijk])


def test_labels_stage_label_volume_matches_the_mimic_list():
    # deep grey matter with veins, iron, calcifications and air: every kind of mimic
    cfg = SimulationConfig(roi_mm=(50.0, 50.0, 30.0), roi_center_mni=(0.0, -18.0, 8.0),
                           spacing_mm=(1.0, 1.0, 2.0), te_ms=30.0, b0_t=3.0, n_cmbs=2)
    st = run_stages(12, cfg, until="labels")
    ids = {m["id"] for m in st.mimics}
    assert set(np.unique(st.mim_lab).tolist()) - {0} == ids
    assert len(ids) == len(st.mimics)
    kinds = {m["type"] for m in st.mimics}
    assert {"vein", "iron"} <= kinds
    for m in st.mimics:
        if m["type"] == "iron":  # iron labels lie on their nucleus
            lbls = st.nuc_t[st.mim_lab == m["id"]]
            assert np.all(lbls == lbls[0]) and lbls[0] > 0
    vein_ids = [m["id"] for m in st.mimics if m["type"] == "vein"]
    assert np.all(st.vf_t[np.isin(st.mim_lab, vein_ids)] >= 0.3)


def test_acquisition_noise_has_the_requested_snr():
    cfg = dict(snr=40.0, roi_mm=30.0)
    quiet = run_stages(6, clean(**cfg), until="acquisition")
    noisy = run_stages(6, clean(noise=True, **cfg), until="acquisition")
    assert noisy.noisy and not quiet.noisy
    d = noisy.sig - quiet.sig
    sd = SimulationConfig().scale / 40.0
    assert np.std(d.real) == pytest.approx(sd, rel=0.03)
    assert np.std(d.imag) == pytest.approx(sd, rel=0.03)
    # scaled so that white matter (most of this ROI) sits near ``scale``
    brain = quiet.brain_t > 0.5
    assert np.median(np.abs(quiet.sig[brain])) == pytest.approx(SimulationConfig().scale, rel=0.1)


@pytest.fixture(scope="module")
def one_cmb():
    cfg = clean(spacing_mm=(0.5, 0.5, 0.5), cmb_specs=[dict(centre_ras=CENTRE, radius_mm=1.0,
                                                             chi_ppm=0.6)])
    return run_stages(3, cfg)


def test_gre_stage_is_the_magnitude_dark_at_the_cmb(one_cmb):
    st = one_cmb
    assert st.gre.dtype == np.float32 and np.array_equal(st.gre, np.abs(st.sig))
    brain = st.brain_t > 0.5
    assert st.gre[t_index(st, CENTRE)] < 0.3 * np.median(st.gre[brain])


def test_swi_stage_darkens_a_paramagnetic_source_at_its_poles(one_cmb):
    st = one_cmb
    assert np.all(st.swi <= st.gre * (1 + 1e-6))  # the phase mask never brightens
    c = np.asarray(CENTRE)
    for sgn in (-1, 1):
        pole = t_index(st, c + [0, 0, sgn * 1.6])  # along B0: negative phase
        assert st.phase[pole] < -0.3 and st.swi[pole] < 0.8 * st.gre[pole]
        equator = t_index(st, c + [sgn * 1.8, 0, 0])  # positive phase: left as on GRE
        assert st.phase[equator] > 0 and st.swi[equator] == pytest.approx(st.gre[equator])
    gre_lab = st.cmb_lab > 0
    assert np.all(st.swi_lab[gre_lab] == st.cmb_lab[gre_lab])
    assert (st.swi_lab > 0).sum() > gre_lab.sum() and st.sig_free is None


def test_qsm_stage_shows_the_cmb_positive_and_nothing_outside_the_brain(one_cmb):
    st = one_cmb
    ijk = t_index(st, CENTRE)
    assert st.qsm[ijk] > 0.2
    assert np.all(st.qsm[st.hull_t <= 0.5] == 0)
    brain = st.brain_t > 0.5
    assert abs(np.median(st.qsm[brain])) < 0.05  # tissue chi vs water, noise-free


def test_truth_stage_matches_labels_and_reports_every_stage(one_cmb):
    s = one_cmb.subject
    assert [c["id"] for c in s.truth["cmbs"]] == [1]
    assert sorted(np.unique(s.cmb_labels.array).tolist()) == [0, 1]
    p = s.truth["params"]
    assert p["swi_power"] == 4 and p["fine_mm"] == 0.25 and p["roi_mm"] == 24.0
    assert p["shape_ijk"] == [int(v) for v in one_cmb.T.shape]
    for m in ("gre", "swi", "qsm"):
        assert s.images[m].same_grid(s.cmb_labels)
    assert set(s.timings) >= {name for name, _ in PIPELINE} | {"template", "total"}
    assert json.loads(json.dumps(s.truth))["params"]["seed"] == 3  # plain JSON
