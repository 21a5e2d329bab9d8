"""Tests of simulation/anatomies.py: each installed real brain gives plausible tissue maps and
nuclei, and the simulator builds subjects on it. Anatomies whose package is missing are skipped;
the first build is slow (registration), later runs load the cache (``CMBDETECTOR_CACHE``)."""
from __future__ import annotations

import numpy as np
import pytest
from CMBDetectorLib.simulation import anatomies
from CMBDetectorLib.simulation.anatomy import NUCLEI, load_template
from CMBDetectorLib.simulation.simulator import SimulationConfig, run_stages, simulate_subject

NAMES = sorted(anatomies.SOURCES)


@pytest.fixture(scope="session")
def built():
    """Every installed anatomy, built (or loaded from the cache) once per session."""
    return {n: anatomies.load_anatomy(n) for n in anatomies.available_anatomies()}


def _get(built, name):
    if name not in built:
        pytest.skip(f"anatomy {name} not installed ({anatomies.SOURCES[name].install})")
    return built[name]


def test_registry_names_licences_and_unknown_names():
    for n, s in anatomies.SOURCES.items():
        assert s.name == n and s.licence and s.install and s.what
    assert set(anatomies.available_anatomies()) <= set(anatomies.SOURCES)
    with pytest.raises(ValueError, match="unknown anatomy"):
        anatomies.load_anatomy("no_such_brain")


@pytest.mark.parametrize("name", NAMES)
def test_tissue_maps_are_fractions_of_a_plausible_brain(built, name):
    a = _get(built, name)
    for m in (a.gm, a.wm, a.brain):
        assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1.0 + 1e-6
    csf = a.brain - a.gm - a.wm
    assert csf.min() > -1e-5  # GM + WM + CSF = brain
    assert np.all(a.gm[a.brain == 0] == 0) and np.all(a.wm[a.brain == 0] == 0)
    if anatomies.SOURCES[name].near_mni:  # templates in MNI space are enlarged like MNI152
        assert 1500 <= a.info["native_brain_ml"] <= 2300
    else:  # real adult brains
        assert 1000 <= a.info["native_brain_ml"] <= 1800
    assert 1400 <= a.info["brain_ml_mni"] <= 2400  # after the affine to MNI152 (1887 ml)
    f = a.info["tissue_fraction"]
    assert 0.3 < f["gm"] < 0.65 and 0.2 < f["wm"] < 0.55 and 0.03 < f["csf"] < 0.35
    assert a.brain.shape == a.gm.shape == a.t1.shape == a.nuclei.shape


@pytest.mark.parametrize("name", NAMES)
def test_nuclei_lie_in_deep_grey_matter_symmetrically(built, name):
    a = _get(built, name)
    mni = load_template()
    for nm, (lab, cen, ax, _, gate) in NUCLEI.items():
        for lbl, sgn in ((lab, 1), (lab + 1, -1)):
            vox = np.argwhere(a.nuclei == lbl)
            assert len(vox) > 10, f"{nm} {lbl} missing"
            assert np.all(a.brain[tuple(vox.T)] > 0.5)
            if gate == "gm":
                assert np.mean(a.gm[tuple(vox.T)]) > 0.4
            c = a.to_mni(vox.mean(0))
            # the anatomy is affinely aligned to MNI: its nuclei stay near MNI152's (a sanity
            # bound: ROBEX's subject differs by up to 13 mm, the templates by 1-3 mm)
            c0 = mni.to_mni(np.argwhere(mni.nuclei == lbl).mean(0))
            assert np.linalg.norm(c - c0) < 16, nm
        r = a.to_mni(np.argwhere(a.nuclei == lab).mean(0))
        left = a.to_mni(np.argwhere(a.nuclei == lab + 1).mean(0))
        assert np.linalg.norm(r - left * [-1, 1, 1]) < 8, nm  # mirror images within 8 mm
        nr, nl = (a.nuclei == lab).sum(), (a.nuclei == lab + 1).sum()
        assert 0.5 < nr / nl < 2.0, nm
    for cat in ("lobar", "deep", "infratentorial"):
        assert len(a.candidates[cat]) > 50
    assert len(a.sulcal) > 100 and len(a.periventricular) > 50 and len(a.hull_top) > 10
    assert a.sinus.max() > 0.5 and np.all(a.sinus[a.brain > 0.5] == 0)


def test_the_cache_reloads_the_same_maps(built, tmp_path):
    if not built:
        pytest.skip("no anatomy installed")
    name = sorted(built)[0]
    a = built[name]
    path = anatomies._cache_path(anatomies.SOURCES[name])
    assert path.is_file()
    b = anatomies._from_npz(path)
    for k in ("gm", "wm", "brain", "nuclei", "sinus", "d_out", "nuclei_frac"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert b.hull_top == a.hull_top and b.info["native_brain_ml"] == a.info["native_brain_ml"]


@pytest.mark.parametrize("name", NAMES)
def test_a_subject_on_the_anatomy_has_its_cmbs_inside_its_brain(built, name):
    _get(built, name)
    cfg = SimulationConfig(anatomy=name, roi_mm=40.0, roi_center_mni=(-20.0, -10.0, 10.0),
                           spacing_mm=(1.0, 1.0, 1.5), n_cmbs=3)
    st = run_stages(3, cfg)
    sub = st.subject
    assert st.params["anatomy"] == name and st.tpl is built[name]
    assert len(sub.truth["cmbs"]) == 3
    brain = sub.brain_mask.array > 0
    for c in sub.truth["cmbs"]:
        ijk = np.round(np.linalg.inv(sub.cmb_labels.ijk_to_ras) @ [*c["centre_ras"], 1])[:3]
        i, j, k = ijk.astype(int)
        assert brain[k, j, i]
        assert sub.cmb_labels.array[k, j, i] == c["id"]
    assert {m["type"] for m in sub.truth["mimics"]} & {"vein", "iron"}


def test_random_anatomy_varies_by_seed_and_is_reproducible(built):
    if not built:
        pytest.skip("no anatomy installed")
    cfg = SimulationConfig(anatomy="random", roi_mm=24.0, roi_center_mni=(-20.0, -10.0, 10.0),
                           spacing_mm=(1.5, 1.5, 2.0), n_cmbs=1, veins=False,
                           calcifications=False)
    seen = {run_stages(s, cfg, until="anatomy").params["anatomy"] for s in range(12)}
    assert len(seen) >= 2 and seen <= {"mni152", *built}
    a, b = simulate_subject(5, cfg), simulate_subject(5, cfg)
    assert np.array_equal(a.images["swi"].array, b.images["swi"].array)
    assert a.truth["cmbs"] == b.truth["cmbs"]


def test_the_default_anatomy_draws_nothing():
    """"mni152" keeps the template and the random stream (the frozen-stream test checks the
    numbers; here the rng state after the stage)."""
    st = run_stages(11, SimulationConfig(roi_mm=20.0), until="iron")
    before = st.rng.bit_generator.state
    from CMBDetectorLib.simulation.simulator import stage_anatomy

    stage_anatomy(st, SimulationConfig(roi_mm=20.0).block("anatomy"))
    assert st.rng.bit_generator.state == before and st.params["anatomy"] == "mni152"


def _blob_pair():
    """Two smooth textured volumes, one shifted and scaled: a small MI registration problem."""
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:48, :48, :48].astype(np.float32) - 24
    base = np.exp(-(x ** 2 / 200 + y ** 2 / 120 + z ** 2 / 160)) + 0.2 * rng.random((48,) * 3)
    moved = np.exp(-((x - 2) ** 2 / 230 + (y + 1) ** 2 / 140 + z ** 2 / 170)) \
        + 0.2 * rng.random((48,) * 3)
    fixed, moving = (sitk.GetImageFromArray(a.astype(np.float32)) for a in (base, moved))
    mask = sitk.Cast(fixed > 0.3, sitk.sitkUInt8)
    return fixed, moving, mask


def test_a_mutual_information_registration_repeats_exactly_on_one_thread():
    import SimpleITK as sitk

    fixed, moving, mask = _blob_pair()
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    results = []
    for _ in range(2):
        with anatomies.single_threaded_itk():
            assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
            tr = anatomies._similarity_mi(sitk.Similarity3DTransform(), fixed, mask, moving)
        results.append(np.array(tr.GetParameters()))
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    assert np.linalg.norm(results[0][3:6]) > 0.5  # it did register (moved the shift)
    assert np.array_equal(results[0], results[1])


def test_building_an_anatomy_registers_on_one_thread(monkeypatch):
    """A build runs its registrations on one ITK thread and gives the setting back, even when
    it fails."""
    import SimpleITK as sitk

    installed = anatomies.available_anatomies()
    if not installed:
        pytest.skip("no anatomy installed")
    seen = []

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        raise Stop

    monkeypatch.setattr(anatomies, "_similarity_mi", record)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with pytest.raises(Stop):
        anatomies.build_anatomy(anatomies.SOURCES[installed[0]])
    assert seen == [1]
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
