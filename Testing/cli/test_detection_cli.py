"""`cmbdetector detect` end to end: outputs readable by Slicer, and every kind of bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from CMBDetectorLib.engine.volume import Volume, write_volume


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def scan(small_subject, tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    write_volume(small_subject.images["swi"], d / "good_swi.nii.gz")
    return d / "good_swi.nii.gz"


@pytest.fixture(scope="module")
def low_models(tiny_run, tmp_path_factory):
    """The tiny bundle with a low operating point so the CLI writes some lesions."""
    import shutil

    d = tmp_path_factory.mktemp("lowmodels")
    shutil.copytree(tiny_run[1], d, dirs_exist_ok=True)
    m = json.loads((d / "manifest.json").read_text())
    m["inference"] = {"candidate_threshold": 0.05, "threshold": 0.0, "min_edge_distance_mm": 0.0,
                      "min_volume_mm3": 0.0, "max_elongation": 1.0,
                      "max_volume_mm3": 1e9}
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.fixture(scope="module")
def outputs(scan, low_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = cli("detect", scan, "--modality", "swi", "--output-dir", out, "--models", low_models)
    assert r.returncode == 0, r.stderr
    return out, r


def test_writes_four_outputs_and_table(outputs):
    out, r = outputs
    for suffix in (".mrk.json", "_lesions.csv", "_cmb.nii.gz", "_detection.json"):
        assert (out / f"good_swi{suffix}").exists()
    assert "microbleed(s) at confidence" in r.stdout


def test_markups_read_back_by_slicer_storage_node(outputs):
    slicer = pytest.importorskip("slicer")
    out, _ = outputs
    rows = list(csv.DictReader(open(out / "good_swi_lesions.csv")))
    assert rows, "expected lesions with the low operating point"
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    node = scene.GetNodeByID(logic.LoadMarkups(str(out / "good_swi.mrk.json")))
    assert node.GetNumberOfControlPoints() == len(rows)
    for n, row in enumerate(rows):
        assert node.GetNthControlPointLabel(n) == row["label"] == f"CMB-{n + 1}"
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(n, p)
        np.testing.assert_allclose(p, [float(row["R"]), float(row["A"]), float(row["S"])],
                                   atol=0.01)
        assert "confidence" in node.GetNthControlPointDescription(n)


def test_label_map_values_match_csv(outputs):
    from CMBDetectorLib.engine.volume import read_volume

    out, _ = outputs
    lm = read_volume(out / "good_swi_cmb.nii.gz")
    rows = list(csv.DictReader(open(out / "good_swi_lesions.csv")))
    assert set(np.unique(lm.array)) - {0} == {int(r["id"]) for r in rows}
    det = json.loads((out / "good_swi_detection.json").read_text())
    assert len(det["candidates"]) >= len(rows) and det["model_version"]


def _write(path, arr, spacing=(1, 1, 1)):
    if arr.ndim == 3:
        write_volume(Volume.from_arrays(arr, spacing=spacing), path)
    else:
        import SimpleITK as sitk
        sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=arr.ndim == 4 and arr.shape[-1] == 3),
                        str(path))


BAD = {
    "flat2d.nii.gz": (np.random.default_rng(0).random((64, 64)).astype(np.float32), "3D"),
    "four_d.nii.gz": (np.random.default_rng(0).random((4, 30, 30, 30)).astype(np.float32), "3D"),
    "rgb.nii.gz": (np.random.default_rng(0).random((30, 30, 30, 3)).astype(np.float32), "scalar"),
    "constant.nii.gz": (np.full((40, 40, 40), 3.0, np.float32), "constant"),
    "nan.mha": (np.where(np.random.default_rng(0).random((40, 40, 40)) > 0.99, np.nan, 1.0)
                   .astype(np.float32), "NaN"),
    "tiny.nii.gz": (np.random.default_rng(0).random((8, 8, 8)).astype(np.float32),
                    "field of view"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_scan_one_line_error_nothing_written(name, tmp_path, low_models):
    arr, msg = BAD[name]
    _write(tmp_path / name, arr)
    before = (tmp_path / name).read_bytes()
    out = tmp_path / "out"
    r = cli("detect", tmp_path / name, "--modality", "gre", "--output-dir", out, "--models",
            low_models)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert err and msg in err[0] and "Traceback" not in r.stderr
    assert (tmp_path / name).read_bytes() == before
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_missing_and_empty_files(tmp_path, low_models):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "junk.nrrd").write_text("hello")
    for p in ("empty.nii.gz", "junk.nrrd", "missing.nii.gz"):
        r = cli("detect", tmp_path / p, "--modality", "swi", "--output-dir", tmp_path / "o",
                "--models", low_models)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert p in r.stderr


def test_unknown_modality_rejected(scan, tmp_path):
    r = cli("detect", scan, "--modality", "flair", "--output-dir", tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_mask_of_other_grid(scan, tmp_path, low_models):
    _write(tmp_path / "mask.nii.gz", np.ones((30, 30, 30), np.float32))
    r = cli("detect", scan, "--modality", "swi", "--mask", tmp_path / "mask.nii.gz",
            "--output-dir", tmp_path / "o", "--models", low_models)
    assert r.returncode == 1 and "another grid" in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_one_bad_scan_does_not_stop_the_batch(scan, tmp_path, low_models):
    (tmp_path / "bad.nii.gz").write_bytes(b"xx")
    out = tmp_path / "o"
    r = cli("detect", tmp_path / "bad.nii.gz", scan, "--modality", "swi", "--output-dir", out,
            "--models", low_models, "--quiet")
    assert r.returncode == 1 and "1 of 2 scan(s) failed" in r.stderr
    assert (out / "good_swi_lesions.csv").exists()


def test_a_projection_gets_a_note_and_still_runs(scan, tmp_path, low_models):
    import shutil

    mip = tmp_path / "sub-01_swi_mIP.nii.gz"
    shutil.copyfile(scan, mip)
    r = cli("detect", scan, mip, "--modality", "swi", "--output-dir", tmp_path / "o",
            "--models", low_models, "--quiet")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "minimum-intensity projection" in line]
    assert len(notes) == 1 and notes[0].startswith("cmbdetector: note: sub-01_swi_mIP.nii.gz")
    assert (tmp_path / "o" / "sub-01_swi_mIP_lesions.csv").exists()


def test_an_mip_named_like_any_swi_is_found_from_its_voxels(small_subject, tmp_path, low_models):
    """A series exported as plain "SWI" that is a sliding minimum over 4 slices: the command
    line says so (with the slab), and detection.json keeps the note."""
    from scipy import ndimage as ndi

    vol = small_subject.images["swi"]
    write_volume(vol.with_array(ndi.minimum_filter1d(vol.array, 4, axis=0)),
                 tmp_path / "sub-02_swi.nii.gz")
    r = cli("detect", tmp_path / "sub-02_swi.nii.gz", "--modality", "swi", "--output-dir",
            tmp_path / "o", "--models", low_models, "--quiet")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "over about 4 slices" in line]
    assert len(notes) == 1 and notes[0].startswith("cmbdetector: note: sub-02_swi.nii.gz")
    saved = json.loads((tmp_path / "o" / "sub-02_swi_detection.json").read_text())
    assert any("over about 4 slices" in w for w in saved["warnings"])


def test_missing_weights_clear_error(scan, tmp_path):
    r = cli("detect", scan, "--modality", "swi", "--output-dir", tmp_path / "o", "--models",
            tmp_path)
    assert r.returncode == 1 and "no trained weights" in r.stderr and "Traceback" not in r.stderr


def test_altered_weights_stop_the_run_once_with_nothing_written(scan, tmp_path, low_models):
    """The weights are checked in a thread while the first scan is read and prepared; a
    failed check still ends the run with one error, not one failure per scan."""
    import shutil

    bad = tmp_path / "bad_models"
    shutil.copytree(low_models, bad)
    with open(bad / "detector.pt", "ab") as fh:
        fh.write(b"tampered")
    out = tmp_path / "o"
    r = cli("detect", scan, scan, "--modality", "swi", "--output-dir", out, "--models", bad,
            "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.count("sha256") == 1 and "scan(s) failed" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_first_scan_prepared_while_loading_equals_detect(scan, low_models, outputs):
    """The first scan goes through prepare_scan + detect_prepared, the others through detect:
    the same scan twice gives the same lesion table."""
    out, _ = outputs
    r = cli("detect", scan, "--modality", "swi", "--output-dir", out.parent / "again",
            "--models", low_models, "--quiet")
    assert r.returncode == 0, r.stderr
    from CMBDetectorLib.engine.detection import detect
    from CMBDetectorLib.engine.models import load_bundle
    from CMBDetectorLib.engine.volume import read_volume

    res = detect(read_volume(scan), "swi", models=load_bundle(low_models, device="cpu"))
    rows = list(csv.DictReader(open(out.parent / "again" / "good_swi_lesions.csv")))
    assert len(rows) == len(res.lesions()) > 0
    np.testing.assert_allclose([float(r["confidence"]) for r in rows],
                               [les.confidence for les in res.lesions()], atol=5e-5)  # 4 decimals
