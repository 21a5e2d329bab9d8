from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from CMBDetectorLib.errors import ModelError
from CMBDetectorLib.engine.models import load_bundle, select_device, verify


def test_missing_manifest_refuses_to_run(tmp_path):
    with pytest.raises(ModelError, match="no trained weights"):
        load_bundle(tmp_path)


def test_altered_weights_refused_with_file_name(tiny_run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_run[1], d)
    with open(d / "student.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="altered: .*student.pt"):
        verify(d)


def test_missing_weights_file_named(tiny_run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_run[1], d)
    (d / "detector.pt").unlink()
    with pytest.raises(ModelError, match="missing: .*detector.pt"):
        verify(d)


def test_pickled_code_is_never_executed(tiny_run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_run[1], d)

    class Evil:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, d / "student.pt")
    manifest = json.loads((d / "manifest.json").read_text())
    from CMBDetectorLib.engine.models import write_manifest
    write_manifest(d, manifest)  # re-hash so only weights_only can stop it
    with pytest.raises(ModelError, match="cannot load"):
        load_bundle(d)
    assert not (tmp_path / "pwned").exists()


def test_bundle_loads_with_manifest_settings(tiny_bundle):
    assert set(tiny_bundle.settings) >= {"candidate_threshold", "threshold"}
    assert not tiny_bundle.detector.training and not tiny_bundle.student.training


def test_device_choice():  # noqa: D103
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(ModelError, match="cuda"):
            select_device("cuda")


def test_default_threshold_per_modality_falls_back_to_the_shared_one():
    from CMBDetectorLib.engine.models import default_threshold

    manifest = {"inference": {"threshold": 0.85, "modality_thresholds": {"gre": 0.75}}}
    assert default_threshold("gre", manifest) == 0.75
    assert default_threshold("swi", manifest) == 0.85
    assert default_threshold("qsm", {"inference": {"threshold": 0.9}}) == 0.9
    assert default_threshold("qsm", {}) == 0.5


def test_auto_falls_back_to_the_cpu_when_cuda_is_present_but_unusable(monkeypatch, tiny_run):
    """A torch build without kernels for the card passes ``is_available()`` and fails at the
    first kernel: ``auto`` must warn and use the CPU, ``cuda`` must say why, and the bundle
    carries the note so detection.json and Slicer show it."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_ones = torch.ones

    def ones(*args, **kw):
        if str(kw.get("device", "")).startswith("cuda"):
            raise RuntimeError("CUDA error: no kernel image is available for execution on "
                               "the device\nmore text")
        return real_ones(*args, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    notes = []
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert select_device("auto", notes).type == "cpu"
    assert len(notes) == 1 and notes[0].endswith("running on the CPU") and "\n" not in notes[0]
    with pytest.raises(ModelError, match="unusable.*no kernel image"):
        select_device("cuda")
    with pytest.warns(RuntimeWarning):
        bundle = load_bundle(tiny_run[1], device="auto")
    assert bundle.device.type == "cpu" and "no kernel image" in bundle.notes[0]


def test_a_working_cuda_device_runs_in_full_float32(monkeypatch):
    """TF32 would round convolutions on the GPU to 10 mantissa bits; choosing CUDA turns it
    off so CPU and GPU give the same confidences (the flags exist in CPU builds too)."""
    from CMBDetectorLib.engine import models

    monkeypatch.setattr(models, "cuda_problem", lambda: None)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        assert select_device("cpu").type == "cpu"
        assert cudnn.allow_tf32  # the CPU path leaves the process alone
        assert select_device("auto").type == "cuda"
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
