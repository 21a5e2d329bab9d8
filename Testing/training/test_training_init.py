"""Runs that continue earlier weights (``init_weights``) and the candidate-threshold floor."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from CMBDetectorLib.engine.networks import Student, UNet3D
from CMBDetectorLib.errors import InputError
from CMBDetectorLib.training import train as train_mod
from CMBDetectorLib.training.train import Run, TrainConfig, candidate_threshold_grid


def test_candidate_threshold_grid_goes_below_0_1_only_when_the_floor_does():
    assert candidate_threshold_grid(0.1) == [0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1]
    low = candidate_threshold_grid(0.02)
    assert low[-3:] == [0.1, 0.05, 0.02] and 0.01 not in low
    assert low == sorted(low, reverse=True)


def _saved_student(folder, cfg, seed=0):
    torch.manual_seed(seed)
    net = Student(in_channels=2, base=cfg.student_base, hidden=cfg.student_hidden)
    folder.mkdir(exist_ok=True)
    torch.save(net.state_dict(), folder / "student.pt")
    return net


def test_init_weights_loads_the_earlier_network_and_records_its_hash(tmp_path):
    cfg = TrainConfig.tiny()
    cfg.init_weights = str(tmp_path / "earlier")
    earlier = _saved_student(tmp_path / "earlier", cfg)
    run = Run(tmp_path / "run", cfg)
    torch.manual_seed(1)
    fresh = Student(in_channels=2, base=cfg.student_base, hidden=cfg.student_hidden)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                      earlier.state_dict().values()))
    run._init_from(fresh, "student")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  earlier.state_dict().values()))
    record = json.loads((tmp_path / "run" / "logs" / "init_source.json").read_text())
    import hashlib
    assert record["student"]["sha256"] == hashlib.sha256(
        (tmp_path / "earlier" / "student.pt").read_bytes()).hexdigest()


def test_init_weights_refuses_a_missing_file_or_another_architecture(tmp_path):
    cfg = TrainConfig.tiny()
    cfg.init_weights = str(tmp_path / "earlier")
    _saved_student(tmp_path / "earlier", cfg)
    run = Run(tmp_path / "run", cfg)
    with pytest.raises(InputError, match="teacher.pt is not a file"):
        run._init_from(Student(in_channels=2, base=2, hidden=4), "teacher")
    with pytest.raises(InputError, match="does not fit"):
        run._init_from(Student(in_channels=2, base=cfg.student_base + 2,
                               hidden=cfg.student_hidden), "student")


def test_without_init_weights_the_network_keeps_its_random_init(tmp_path):
    run = Run(tmp_path / "run", TrainConfig.tiny())
    net = Student(in_channels=2, base=2, hidden=4)
    before = [p.clone() for p in net.parameters()]
    run._init_from(net, "student")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert not (tmp_path / "run" / "logs" / "init_source.json").exists()


def test_the_detector_phase_starts_from_init_weights(tmp_path, monkeypatch):
    cfg = TrainConfig.tiny()
    cfg.init_weights = str(tmp_path / "earlier")
    (tmp_path / "earlier").mkdir()
    torch.manual_seed(3)
    earlier = UNet3D(2, cfg.detector_base)
    torch.save(earlier.state_dict(), tmp_path / "earlier" / "detector.pt")
    run = Run(tmp_path / "run", cfg)
    size = cfg.detector_patch
    bank = (np.zeros((2, size, size, size), np.float16), np.zeros((2, size, size, size), np.uint8),
            np.array([1, 0], np.int8))
    monkeypatch.setattr(run, "detector_bank", lambda: bank)
    monkeypatch.setattr(train_mod, "fit", lambda model, *a, **k: [])  # no step: init only
    run.train_detector()
    saved = torch.load(tmp_path / "run" / "weights" / "detector.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in earlier.state_dict().items())


def test_students_side_by_side_equal_one_after_the_other(tiny_run, tmp_path):
    """With two jobs the two students train in two processes; the weights are those of the
    sequential phase (up to the rounding of another thread count)."""
    import shutil

    src, _ = tiny_run
    shutil.copytree(src, tmp_path / "run")
    for name in ("student", "student_nokd"):
        (tmp_path / "run" / "weights" / f"{name}.pt").unlink()
        (tmp_path / "run" / "ckpt" / f"{name}.ckpt").unlink()
    run = Run(tmp_path / "run", TrainConfig.tiny())
    run.jobs = 2
    run.train_students()
    for name in ("student", "student_nokd"):
        new = torch.load(tmp_path / "run" / "weights" / f"{name}.pt", weights_only=True)
        old = torch.load(src / "weights" / f"{name}.pt", weights_only=True)
        assert new.keys() == old.keys()
        for k in old:
            assert torch.allclose(new[k].float(), old[k].float(), atol=1e-4), (name, k)
    distilled = torch.load(tmp_path / "run" / "weights" / "student.pt", weights_only=True)
    control = torch.load(tmp_path / "run" / "weights" / "student_nokd.pt", weights_only=True)
    assert any(not torch.equal(distilled[k], control[k]) for k in distilled)  # two trainings
