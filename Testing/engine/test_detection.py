"""detect() plumbing with the tiny test bundle: geometry, thresholds, progress, cancel."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from CMBDetectorLib.engine.detection import detect
from CMBDetectorLib.errors import Cancelled, InputError
from CMBDetectorLib.engine.settings import DetectionSettings


@pytest.fixture(scope="module")
def low_settings():
    # Low thresholds so the barely trained tiny models produce candidates to check.
    return DetectionSettings(candidate_threshold=0.05, threshold=0.0, min_edge_distance_mm=0.0,
                             min_volume_mm3=0.0, max_elongation=1.0, max_volume_mm3=1e9)


@pytest.fixture(scope="module")
def run(small_subject, tiny_bundle, low_settings):
    vol = small_subject.images["swi"]
    before = vol.array.copy()
    stages = []
    res = detect(vol, "swi", settings=low_settings, models=tiny_bundle,
                 progress=lambda s, f: stages.append((s, f)))
    return vol, before, res, stages


def test_input_not_modified(run):
    vol, before, _, _ = run
    np.testing.assert_array_equal(vol.array, before)


def test_candidates_ras_and_ijk_agree(run):
    vol, _, res, _ = run
    assert res.candidates, "tiny models at threshold 0.05 should yield candidates"
    for c in res.candidates:
        np.testing.assert_allclose(vol.ijk_to_ras_points([c.centroid_ijk])[0], c.centroid_ras,
                                   atol=1e-6)


def test_label_map_on_input_grid_matches_lesions(run):
    vol, _, res, _ = run
    lm = res.label_map(0.0)
    assert lm.shape == vol.array.shape
    lesions = res.lesions(0.0)
    assert set(np.unique(lm)) - {0} == {les.id for les in lesions}
    for les in lesions[:5]:  # the centroid voxel is near a voxel of its own label
        idx = np.argwhere(lm == les.id)[:, ::-1]
        d = np.linalg.norm(vol.ijk_to_ras_points(idx) - np.array(les.centroid_ras), axis=1)
        assert d.min() < 3.0


def test_rethreshold_is_monotonic_and_instant(run):
    import time

    _, _, res, _ = run
    counts = []
    t0 = time.perf_counter()
    for t in np.linspace(0, 1, 21):
        counts.append(len(res.lesions(t)))
    assert (time.perf_counter() - t0) / 21 < 0.01
    assert counts == sorted(counts, reverse=True)
    confs = [les.confidence for les in res.lesions(0.0)]
    assert confs == sorted(confs, reverse=True)
    assert [les.label for les in res.lesions(0.0)][:2] == ["CMB-1", "CMB-2"][:len(confs)]


def test_progress_reports_stages_and_ends_at_one(run):
    stages = run[3]
    names = [s for s, _ in stages]
    for s in ("preprocessing", "candidate detection", "discrimination", "clean-up"):
        assert s in names
    fr = [f for _, f in stages]
    assert fr == sorted(fr) and fr[-1] == 1.0


def test_cancel_raises(small_subject, tiny_bundle):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        detect(small_subject.images["swi"], "swi", models=tiny_bundle, cancel=cancel)


def test_mask_of_other_grid_rejected(small_subject, tiny_bundle):
    from CMBDetectorLib.engine.volume import Volume

    with pytest.raises(InputError, match="another grid"):
        detect(small_subject.images["swi"], "swi", Volume.from_arrays(np.ones((30, 30, 30))),
               models=tiny_bundle)


def test_given_mask_restricts_candidates(small_subject, tiny_bundle, low_settings):
    vol = small_subject.images["qsm"]
    m = np.zeros(vol.array.shape, np.uint8)
    k, j, i = (np.array(vol.array.shape) // 2)
    m[k - 12:k + 12, j - 15:j + 15, i - 15:i + 15] = 1
    res = detect(vol, "qsm", vol.with_array(m), low_settings, tiny_bundle)
    lo = np.array([i - 15, j - 15, k - 12]) - 2
    hi = np.array([i + 15, j + 15, k + 12]) + 2
    for c in res.candidates:
        assert np.all(np.array(c.centroid_ijk) >= lo) and np.all(np.array(c.centroid_ijk) <= hi)
    assert abs(int((res.brain_mask > 0).sum()) - int(m.sum())) < 0.2 * m.sum()


def test_per_modality_threshold_applies_to_its_modality_only(small_subject, tiny_bundle,
                                                             low_settings):
    from dataclasses import replace

    vol = small_subject.images["swi"]
    s = replace(low_settings, threshold=0.3, modality_thresholds={"swi": 0.7, "gre": 0.1})
    res = detect(vol, "swi", settings=s, models=tiny_bundle)
    assert res.threshold == 0.7
    expected = {c.index for c in res.candidates if c.kept and c.confidence >= 0.7}
    assert {x.candidate_index for x in res.lesions()} == expected
    assert len(expected) < sum(c.kept for c in res.candidates)  # 0.7 removes some
    res_qsm = detect(small_subject.images["qsm"], "qsm", settings=s, models=tiny_bundle)
    assert res_qsm.threshold == 0.3  # not listed: the shared threshold


def test_explicit_threshold_overrides_the_models_per_modality_ones(tiny_bundle):
    from dataclasses import replace

    from CMBDetectorLib.engine.detection import default_settings

    bundle = replace(tiny_bundle, settings={**tiny_bundle.settings, "threshold": 0.5,
                                            "modality_thresholds": {"gre": 0.8}})
    assert default_settings(bundle).threshold_for("gre") == 0.8
    assert default_settings(bundle).threshold_for("swi") == 0.5
    assert default_settings(bundle, threshold=0.2).threshold_for("gre") == 0.2
    assert default_settings(bundle, threshold=None).threshold_for("gre") == 0.8


def test_gpu_fallback_is_recorded_with_the_device_used(small_subject, tiny_bundle, low_settings,
                                                       monkeypatch, tmp_path):
    """A CUDA out-of-memory fallback warns, and the result and detection.json say so and name
    the device the networks actually ran on (not only the one requested)."""
    import json
    import warnings

    import CMBDetectorLib.engine.detection as detection
    from CMBDetectorLib.engine.outputs import write_outputs

    original = detection.predict_volume

    def oom_then_cpu(*args, **kw):
        warnings.warn("CUDA out of memory; retrying on the CPU", RuntimeWarning)
        return original(*args, **kw)

    monkeypatch.setattr(detection, "predict_volume", oom_then_cpu)
    vol = small_subject.images["swi"]
    with pytest.warns(RuntimeWarning, match="out of memory"):  # still shown on the console
        res = detect(vol, "swi", settings=low_settings, models=tiny_bundle)
    assert res.warnings == ["CUDA out of memory; retrying on the CPU"]
    assert res.device == "cpu" and res.settings["device"] == low_settings.device
    paths = write_outputs(vol, res, tmp_path, name="s")
    doc = json.loads(paths["json"].read_text())
    assert doc["device"] == "cpu" and doc["warnings"] == res.warnings


def test_a_device_fallback_at_loading_reaches_the_result(small_subject, tiny_bundle,
                                                         low_settings):
    from dataclasses import replace

    note = "CUDA is present but unusable (no kernel image); running on the CPU"
    res = detect(small_subject.images["swi"], "swi", settings=low_settings,
                 models=replace(tiny_bundle, notes=[note]))
    assert res.warnings[0] == note and res.device == "cpu" and res.device_name == ""
    assert res.summary()["device_name"] == "" and res.summary()["warnings"][0] == note


def test_prepared_then_detected_equals_detect(run, tiny_bundle, low_settings):
    """The cohort's prefetch path (preprocess elsewhere, detect here) gives detect()'s result."""
    import pickle

    from CMBDetectorLib.engine.detection import detect_prepared, prepare_scan

    vol, _, res, _ = run
    prepared = pickle.loads(pickle.dumps(prepare_scan(vol, "swi", None, low_settings)))
    other = detect_prepared(prepared, tiny_bundle)
    assert other.candidates == res.candidates and other.settings == res.settings
    np.testing.assert_array_equal(other.candidate_labels, res.candidate_labels)
    np.testing.assert_array_equal(other.brain_mask, res.brain_mask)
    assert set(other.timings) == set(res.timings)
    assert other.timings["preprocessing"] == prepared.preprocess_s > 0


def test_the_fast_inference_form_of_the_bundle_finds_the_same_lesions_on_the_demo_scan():
    """Folding batch norm and the channels-last layout must not change what the bundled
    models find: same lesion set, confidences within 0.01."""
    from pathlib import Path

    from CMBDetectorLib.engine.models import load_bundle
    from CMBDetectorLib.engine.volume import read_volume

    demo = (Path(__file__).resolve().parents[2] / "CMBDetector" / "Resources" / "SampleData"
            / "CMBDemo_SWI.nii.gz")
    vol = read_volume(demo)
    plain = detect(vol, "swi", models=load_bundle(device="cpu", optimise=False))
    fast = detect(vol, "swi", models=load_bundle(device="cpu"))
    assert len(plain.lesions()) >= 3  # the demo's CMBs are found at all
    np.testing.assert_allclose([les.centroid_ras for les in fast.lesions()],
                               [les.centroid_ras for les in plain.lesions()], atol=1e-3)
    assert [les.confidence for les in fast.lesions()] == pytest.approx(
        [les.confidence for les in plain.lesions()], abs=0.01)


def test_the_manifest_inference_block_gives_the_bundles_settings(tiny_bundle, tiny_run):
    """The CLI takes the operating point from the manifest before the networks load: the
    same settings as from the loaded bundle."""
    from CMBDetectorLib.engine.detection import default_settings
    from CMBDetectorLib.engine.models import read_manifest

    block = read_manifest(tiny_run[1]).get("inference", {})
    assert block  # the tiny bundle has an operating point
    assert default_settings(block, threshold=0.3) == default_settings(tiny_bundle, threshold=0.3)
    assert default_settings(block) == default_settings(tiny_bundle)


def test_an_mip_is_reversed_before_the_networks_see_it(small_subject, tiny_bundle,
                                                       low_settings):
    """With ``reverse_projection`` (the default) the networks see the opening of the scan: the
    candidates of the mIP overlap the unprojected scan's better than without it, and the note
    says the detection ran on the reversed image."""
    from dataclasses import replace

    from scipy import ndimage as ndi

    vol = small_subject.images["swi"]
    mip = vol.with_array(ndi.minimum_filter1d(vol.array, 3, axis=0))
    plain = detect(vol, "swi", settings=low_settings, models=tiny_bundle)
    back = detect(mip, "swi", settings=low_settings, models=tiny_bundle)
    kept = detect(mip, "swi", settings=replace(low_settings, reverse_projection=False),
                  models=tiny_bundle)
    assert any("Detection runs on it reversed" in w for w in back.warnings)
    assert not any("measured across" in w for w in back.warnings)
    assert not any("reversed" in w for w in kept.warnings)

    def dice(a, b):
        a, b = a > 0, b > 0
        return 2 * (a & b).sum() / max(1, a.sum() + b.sum())

    labels = plain.candidate_labels
    assert labels.any()
    assert dice(back.candidate_labels, labels) > dice(kept.candidate_labels, labels) + 0.02


def test_an_mip_is_reported_and_measured_across_when_asked(small_subject, tiny_bundle,
                                                           low_settings):
    """The SWI under a sliding minimum over 3 slices, detected without the reversal: the
    result says so (with the slab), and with ``shape_across_projection`` (the default) the
    clean-up's elongation drops for the stretched candidates; an unprojected scan carries no
    such note."""
    from dataclasses import replace

    from scipy import ndimage as ndi

    vol = small_subject.images["swi"]
    mip = vol.with_array(ndi.minimum_filter1d(vol.array, 3, axis=0))
    kept = replace(low_settings, reverse_projection=False)
    plain = detect(mip, "swi", settings=replace(kept, shape_across_projection=False),
                   models=tiny_bundle)
    across = detect(mip, "swi", settings=kept, models=tiny_bundle)
    assert any("over about 3 slices" in w for w in plain.warnings)
    assert not any("measured across" in w for w in plain.warnings)
    assert any("measured across the projection" in w for w in across.warnings)
    assert not any("projection" in w for w in detect(vol, "swi", settings=low_settings,
                                                     models=tiny_bundle).warnings)
    big = [n for n, c in enumerate(plain.candidates) if c.volume_mm3 >= 20]
    assert big and len(across.candidates) == len(plain.candidates)
    assert (np.mean([across.candidates[n].elongation for n in big])
            < np.mean([plain.candidates[n].elongation for n in big]))
