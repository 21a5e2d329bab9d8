"""Physics checks of the CMB simulator on small regions of interest (a few seconds in total)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest.importorskip("nilearn")
pytest.importorskip("nibabel")

from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject, write_subject  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402

CENTRE = (30.0, -20.0, 30.0)  # MNI mm, parietal white matter


def clean(**kw):
    """A noise-free, mimic-free ROI without deformation: subject RAS == template MNI."""
    base = dict(roi_mm=24.0, roi_center_mni=CENTRE, spacing_mm=(0.5, 0.5, 0.5), te_ms=20.0,
                b0_t=3.0, oblique_deg=0.0, flip_axes=False, deform=False, veins=False,
                calcifications=False, iron=False, air=False, noise=False, bias=False, n_cmbs=0)
    base.update(kw)
    return SimulationConfig(**base)


def value_at(vol, ras):
    ijk = np.round(vol.ras_to_ijk_points(np.asarray(ras, float)[None])[0]).astype(int)
    return float(vol.array[ijk[2], ijk[1], ijk[0]])


def shell(vol, ras, r_in, r_out):
    """Values of voxels between r_in and r_out mm from ``ras``."""
    a = vol.array
    k, j, i = np.indices(a.shape)
    pts = vol.ijk_to_ras_points(np.c_[i.ravel(), j.ravel(), k.ravel()])
    d = np.linalg.norm(pts - np.asarray(ras), axis=1).reshape(a.shape)
    return a[(d >= r_in) & (d <= r_out)]


def dark_volume(vol, ras, box_mm=10.0):
    """Apparent (signal-deficit) volume in mm^3: sum of max(0, 1 - I/background) x voxel volume
    within ``box_mm`` of ``ras``; equals the true volume for a black sphere without blooming."""
    bg = np.median(shell(vol, ras, box_mm, box_mm + 2))
    deficit = np.clip(1.0 - shell(vol, ras, 0, box_mm) / bg, 0, None)
    return float(deficit.sum() * np.prod(vol.spacing))


@pytest.fixture(scope="module")
def single_cmb():
    cfg = clean(cmb_specs=[dict(centre_ras=CENTRE, radius_mm=1.0, chi_ppm=0.6)])
    return simulate_subject(3, cfg)


def test_cmb_dark_on_gre_swi_bright_on_qsm(single_cmb):
    s = single_cmb
    for mod in ("gre", "swi"):
        v = s.images[mod]
        assert value_at(v, CENTRE) < 0.3 * np.median(shell(v, CENTRE, 6, 9)), mod
    q = s.images["qsm"]
    assert value_at(q, CENTRE) > np.median(shell(q, CENTRE, 6, 9)) + 0.2
    # truth and label map agree
    (cmb,) = s.truth["cmbs"]
    assert cmb["chi_ppm"] == pytest.approx(0.6) and cmb["radius_mm"] == pytest.approx(1.0)
    assert value_at(s.cmb_labels, cmb["centre_ras"]) == cmb["id"] == 1
    assert s.images["gre"].same_grid(s.cmb_labels) and s.images["qsm"].same_grid(s.brain_mask)


def test_blooming_grows_with_te_and_field_strength():
    spec = [dict(centre_ras=CENTRE, radius_mm=0.8, chi_ppm=0.6)]
    v = {}
    for te, b0 in ((15.0, 3.0), (40.0, 3.0), (25.0, 1.5), (25.0, 3.0)):
        cfg = clean(cmb_specs=spec, te_ms=te, b0_t=b0, spacing_mm=(0.6, 0.6, 1.2))
        s = simulate_subject(1, cfg)
        v[(te, b0)] = dark_volume(s.images["gre"], CENTRE)
        lab = s.truth["cmbs"][0]["n_label_voxels"]
        v[("lab", te, b0)] = lab
    assert v[(40.0, 3.0)] > 1.4 * v[(15.0, 3.0)], v
    assert v[(25.0, 3.0)] > 1.2 * v[(25.0, 1.5)], v  # phase doubles (TE x2 gives ~1.3 too)
    assert v[("lab", 40.0, 3.0)] > v[("lab", 15.0, 3.0)], v
    # the true lesion volume is fixed; the dark volume exceeds it (blooming)
    true_mm3 = 4 / 3 * np.pi * 0.8 ** 3
    assert v[(15.0, 3.0)] > 1.2 * true_mm3 and v[(40.0, 3.0)] > 2.0 * true_mm3, v


def test_calcification_opposite_sign_to_cmb_on_qsm_and_phase():
    cmb = (CENTRE[0] - 6, CENTRE[1], CENTRE[2])
    calc = (CENTRE[0] + 6, CENTRE[1], CENTRE[2])
    cfg = clean(roi_mm=32.0, cmb_specs=[dict(centre_ras=cmb, radius_mm=1.2, chi_ppm=0.8)],
                calc_specs=[dict(centre_ras=calc, radius_mm=1.2, chi_ppm=-2.0)])
    s = simulate_subject(5, cfg)
    q = s.images["qsm"]
    assert value_at(q, cmb) > 0.2 and value_at(q, calc) < -0.5
    # both dark on magnitude
    g = s.images["gre"]
    for c in (cmb, calc):
        assert value_at(g, c) < 0.5 * np.median(shell(g, c, 6, 8))
    # high-pass phase at the poles along B0 (z): negative for the paramagnetic CMB,
    # positive for the diamagnetic calcification
    def pole_phase(c, r):
        vals = [value_at(s.phase, (c[0], c[1], c[2] + sgn * d))
                for sgn in (-1, 1) for d in np.linspace(1.3 * r, 2.0 * r, 3)]
        return float(np.mean(vals))

    assert pole_phase(cmb, 1.2) < -0.3
    assert pole_phase(calc, 1.2) > 0.3
    types = [m["type"] for m in s.truth["mimics"]]
    assert types == ["calcification"]
    assert value_at(s.mimic_labels, calc) == s.truth["mimics"][0]["id"]


def test_veins_are_elongated_in_3d():
    cfg = SimulationConfig(roi_mm=60.0, roi_center_mni=(25.0, -15.0, 25.0),
                           spacing_mm=(0.8, 0.8, 0.8), te_ms=25.0, b0_t=3.0, n_cmbs=0,
                           calcifications=False, air=False, noise=False, vein_density=1.5)
    s = simulate_subject(11, cfg)
    lab = s.mimic_labels
    veins = [m for m in s.truth["mimics"] if m["type"] == "vein"]
    assert len(veins) >= 3
    ratios = []
    for m in veins:
        kji = np.argwhere(lab.array == m["id"])
        if len(kji) < 10:
            continue
        pts = lab.ijk_to_ras_points(kji[:, ::-1])
        ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T)))[::-1]
        ratios.append(np.sqrt(ev[0] / max(ev[1], 1e-6)))
    assert len(ratios) >= 3
    assert np.median(ratios) > 3.0, ratios
    # veins are dark on SWI: mean SWI over vein voxels below the brain median
    swi = s.images["swi"].array
    vm = np.isin(lab.array, [m["id"] for m in veins])
    brain = s.brain_mask.array > 0
    assert swi[vm & brain].mean() < 0.85 * np.median(swi[brain])


@pytest.mark.parametrize("seed", [21, 22])
def test_truth_centres_land_on_lesions_oblique_anisotropic(tmp_path, seed):
    cfg = SimulationConfig(roi_mm=(60.0, 60.0, 50.0), roi_center_mni=(20.0, -10.0, 20.0),
                           spacing_mm=(0.7, 0.7, 2.0), oblique_deg=25.0, flip_axes=True,
                           te_ms=30.0, b0_t=3.0, n_cmbs=5, cmb_radius_mm=1.2, noise=False,
                           veins=False, air=False)
    s = simulate_subject(seed, cfg)
    d = s.images["gre"].direction
    assert not np.allclose(np.abs(d), np.eye(3), atol=1e-3)  # really oblique
    assert len(s.truth["cmbs"]) >= 3
    paths = write_subject(s, tmp_path, "sub")
    lab = read_volume(paths["cmb"])
    gre = read_volume(paths["gre"])
    truth = json.loads(paths["truth"].read_text())
    assert truth == json.loads(json.dumps(s.truth))
    for c in truth["cmbs"]:
        assert value_at(lab, c["centre_ras"]) == c["id"]
        assert value_at(gre, c["centre_ras"]) < 0.6 * np.median(shell(gre, c["centre_ras"], 7, 10))
        assert c["category"] in ("lobar", "deep", "infratentorial") and c["region"]
    # label ids are exactly the truth ids
    assert sorted(np.unique(lab.array[lab.array > 0]).tolist()) == \
        [c["id"] for c in truth["cmbs"]]
    for name in ("swi", "qsm", "mimics", "brainmask"):
        assert paths[name].exists()


def test_fixed_seed_gives_identical_output():
    cfg = SimulationConfig(roi_mm=30.0, spacing_mm=(1.0, 1.0, 1.5), n_cmbs=2)
    a = simulate_subject(7, cfg)
    b = simulate_subject(7, cfg)
    c = simulate_subject(8, cfg)
    for m in ("gre", "swi", "qsm"):
        assert np.array_equal(a.images[m].array, b.images[m].array)
        assert np.allclose(a.images[m].ijk_to_ras, b.images[m].ijk_to_ras)
    assert np.array_equal(a.cmb_labels.array, b.cmb_labels.array)
    assert json.dumps(a.truth) == json.dumps(b.truth)
    assert a.truth["params"] != c.truth["params"]


def test_random_parameters_within_published_ranges():
    cfg = SimulationConfig(roi_mm=20.0)
    for seed in range(3):
        p = simulate_subject(seed, cfg).truth["params"]
        assert 15 <= p["TE_ms"] <= 40 and p["B0_T"] in (1.5, 3.0)
        assert 0.45 <= p["spacing"][0] <= 1.0 and 0.6 <= p["spacing"][2] <= 3.0


def test_demo_scan_matches_its_truth():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "CMBDetector" / "Resources" / "SampleData"
    scan = root / "CMBDemo_SWI.nii.gz"
    if not scan.exists():
        pytest.skip("demo scan not generated")
    vol = read_volume(scan)
    lab = read_volume(root / "CMBDemo_SWI_cmb.nii.gz")
    truth = json.loads((root / "CMBDemo_SWI_truth.json").read_text())
    assert vol.same_grid(lab)
    assert 4 <= len(truth["cmbs"]) <= 8
    for c in truth["cmbs"]:
        assert value_at(lab, c["centre_ras"]) == c["id"]
        assert value_at(vol, c["centre_ras"]) < np.median(shell(vol, c["centre_ras"], 7, 10))
    total = sum(p.stat().st_size for p in root.glob("CMBDemo_SWI*"))
    assert total <= 5 * 1024 * 1024


def test_synth_cli_writes_requested_modalities(tmp_path, capsys):
    from CMBDetectorLib.cli.main import main

    rc = main(["synth", "--n", "2", "--modality", "swi", "--out", str(tmp_path), "--seed", "3",
               "--roi-mm", "24", "--n-cmbs", "1", "--spacing", "1", "1", "1.5"])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    for seed in (3, 4):
        assert f"sub-{seed:05d}_swi.nii.gz" in names and f"sub-{seed:05d}_truth.json" in names
        assert f"sub-{seed:05d}_cmb.nii.gz" in names
    assert not any(n.endswith("_gre.nii.gz") or n.endswith("_qsm.nii.gz") for n in names)
    err = capsys.readouterr().err
    assert "2/2" in err  # progress bar on stderr
    assert main(["synth", "--n", "1"]) == 1  # --out missing: one-line user error
    assert main(["synth", "--n", "1", "--out", str(tmp_path), "--min-visible-mm", "-1"]) == 1
    rc = main(["synth", "--n", "1", "--out", str(tmp_path / "rated"), "--seed", "5", "--roi-mm",
               "40", "--n-cmbs", "3", "--b0", "1.5", "--te", "15", "--min-visible-mm", "2"])
    truth = json.loads((tmp_path / "rated" / "sub-00005_truth.json").read_text())
    assert rc == 0 and truth["params"]["min_visible_diameter_mm"] == 2.0
    assert truth["cmbs"] and all(c["visible_diameter_mm"] >= 2.0 for c in truth["cmbs"])


def test_oblique_b0_rotates_the_dipole_pattern():
    b = np.array([0.0, 0.5, 1.0])
    b /= np.linalg.norm(b)
    cfg = clean(b0_dir=tuple(b), cmb_specs=[dict(centre_ras=CENTRE, radius_mm=1.0, chi_ppm=0.6)])
    s = simulate_subject(3, cfg)
    c = np.asarray(CENTRE)
    perp = np.cross(b, [1.0, 0.0, 0.0])
    perp /= np.linalg.norm(perp)
    for sgn in (-1, 1):
        assert value_at(s.phase, c + sgn * 1.6 * b) < -0.5  # poles along the oblique B0
        assert value_at(s.phase, c + sgn * 1.6 * perp) > 0.2  # equator
    assert s.truth["params"]["b0_dir_ras"] == pytest.approx(list(b))


def test_dark_context_centres_cmbs_next_to_what_swi_shows_dark():
    base = dict(roi_mm=60.0, roi_center_mni=(25.0, -15.0, 25.0), spacing_mm=(1.0, 1.0, 1.0),
                te_ms=25.0, b0_t=3.0, calcifications=False, noise=False, bias=False)
    free = simulate_subject(11, SimulationConfig(n_cmbs=0, **base))  # same veins, no lesion
    swi, brain = free.images["swi"], free.brain_mask.array > 0
    dark = brain & (swi.array < 0.5 * np.median(swi.array[brain]))
    dark_ras = swi.ijk_to_ras_points(np.argwhere(dark)[:, ::-1])

    def distances(share):
        s = simulate_subject(11, SimulationConfig(n_cmbs=5, cmb_dark_context=share, **base))
        centres = np.array([c["centre_ras"] for c in s.truth["cmbs"]])
        return np.array([np.linalg.norm(dark_ras - c, axis=1).min() for c in centres])

    # about half of this ROI's brain lies within 3.9 mm of a dark voxel, so five CMBs placed
    # there by chance would happen about once in 30 seeds; the natural placement misses it
    near = distances(1.0)
    assert len(near) == 5 and np.all(near <= 3.0 + np.sqrt(3) / 2)  # site 0.5-3 mm, +/- half voxel
    assert not np.all(distances(0.0) <= 3.0 + np.sqrt(3) / 2)


def test_dark_context_zero_is_the_natural_placement():
    cfg = dict(roi_mm=30.0, spacing_mm=(1.0, 1.0, 1.5), n_cmbs=2)
    a = simulate_subject(7, SimulationConfig(**cfg))
    b = simulate_subject(7, SimulationConfig(cmb_dark_context=0.0, **cfg))
    assert json.dumps(a.truth) == json.dumps(b.truth)
    assert np.array_equal(a.images["swi"].array, b.images["swi"].array)


def test_min_visible_diameter_redraws_cmbs_too_faint_to_see():
    # 1.5 T, short TE, thick slices: many drawn sources leave no visible footprint
    cfg = dict(roi_mm=50.0, spacing_mm=(1.0, 1.0, 2.5), te_ms=15.0, b0_t=1.5, n_cmbs=8,
               noise=False, bias=False)
    vox = 2.5

    def diameters(min_d):
        out = []
        for seed in (0, 1, 2):
            s = simulate_subject(seed, SimulationConfig(min_visible_diameter_mm=min_d, **cfg))
            lab = s.cmb_labels.array
            for c in s.truth["cmbs"]:
                n_lab = int((lab == c["label"]).sum())
                # the labelled footprint holds at least the attenuated voxels
                assert n_lab * vox * 1.01 >= 4 / 3 * np.pi * (c["visible_diameter_mm"] / 2) ** 3
                out.append(c["visible_diameter_mm"])
            assert s.truth["params"]["min_visible_diameter_mm"] == min_d
        return np.array(out)

    natural, rated = diameters(0.0), diameters(2.0)
    assert np.any(natural < 2.0)
    assert len(rated) >= 0.9 * len(natural) and np.all(rated >= 2.0)


def test_min_visible_diameter_leaves_explicit_cmbs_alone():
    spec = [dict(centre_ras=CENTRE, radius_mm=0.3, chi_ppm=0.3)]
    s = simulate_subject(0, clean(te_ms=15.0, b0_t=1.5, spacing_mm=(1.0, 1.0, 2.0),
                                  cmb_specs=spec, min_visible_diameter_mm=2.0))
    assert len(s.truth["cmbs"]) == 1
    c = s.truth["cmbs"][0]
    assert c["radius_mm"] == 0.3 and c["visible_diameter_mm"] < 2.0


def test_swi_footprint_of_a_cmb_in_bright_tissue_and_in_a_dark_band():
    from CMBDetectorLib.simulation.simulator import _swi_footprints

    # lesion-free SWI: tissue at 1.0, a phase band (x >= 20) the phase mask has crushed to 0.05;
    # both CMBs remove 80 % of the signal in a 3x3x3 block that is also their GRE label
    free = np.ones((30, 30, 40), np.float32)
    free[:, :, 20:] = 0.05
    swi = free.copy()
    lab = np.zeros(free.shape, np.uint16)
    blocks = {1: (slice(9, 12), slice(9, 12), slice(9, 12)),
              2: (slice(9, 12), slice(9, 12), slice(29, 32))}
    for cid, b in blocks.items():
        swi[b] *= 0.2
        lab[b] = cid
    cmbs = [{"label": 1}, {"label": 2}]
    slabs = [tuple(slice(s.start - 3, s.stop + 3) for s in b) for b in blocks.values()]
    swi_lab = _swi_footprints(cmbs, slabs, lab, swi, free, np.ones(free.shape, bool), 1.0)
    # 27 mm^3 -> the equal-volume sphere's diameter; the band hides the second one
    assert cmbs[0]["swi_visible_diameter_mm"] == pytest.approx(2 * (3 * 27 / (4 * np.pi)) ** (1 / 3),
                                                               abs=1e-3)
    assert cmbs[1]["swi_visible_diameter_mm"] == 0.0
    assert np.array_equal(swi_lab, lab)  # footprints inside the labels add nothing


def test_swi_visibility_is_recorded_without_changing_the_images(single_cmb):
    (cmb,) = single_cmb.truth["cmbs"]
    # a 1 mm, 0.6 ppm CMB at 3 T, TE 20 ms in clean tissue: SWI blooms at least as much as GRE
    assert cmb["swi_visible_diameter_mm"] >= cmb["visible_diameter_mm"] > 2.0
    # the SWI label map holds the GRE label and more: the phase mask darkens the lobes along B0
    gre_lab, swi_lab = single_cmb.cmb_labels.array, single_cmb.swi_cmb_labels.array
    assert np.all(swi_lab[gre_lab > 0] == gre_lab[gre_lab > 0])
    assert (swi_lab == 1).sum() > (gre_lab == 1).sum()
    assert set(np.unique(swi_lab).tolist()) == {0, 1}
