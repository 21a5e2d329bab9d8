"""Shared fixtures: small simulated scans and a tiny *trained* model bundle for plumbing tests.

The tiny bundle is trained in seconds by ``cmbdetector train --tiny``; it exercises the real
training and loading code but is never shipped and never used for accuracy claims.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# The library never sets SimpleITK's process-wide thread count (it would slow every filter in
# Slicer); the tests limit it the way ITK reads it, from the environment.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", os.environ["OMP_NUM_THREADS"])


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from CMBDetectorLib.training.train import TrainConfig, run_training

    run = tmp_path_factory.mktemp("tinyrun")
    models = tmp_path_factory.mktemp("tinymodels")
    run_training(run / "run", TrainConfig.tiny(), models)
    import torch  # retraining tests must use the same thread count to be bit-identical

    (run / "run" / "torch_threads.txt").write_text(str(torch.get_num_threads()))
    return run / "run", models


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run):
    from CMBDetectorLib.engine.models import load_bundle

    return load_bundle(tiny_run[1], device="cpu")


@pytest.fixture(scope="session")
def small_subject():
    """A 64 mm simulated cube with 3 CMBs, oblique and anisotropic (seconds to make)."""
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    return simulate_subject(4242, SimulationConfig(roi_mm=64.0, spacing_mm=(0.9, 0.9, 1.6),
                                                   n_cmbs=3))


@pytest.fixture(scope="session")
def whole_subject():
    """A whole-brain simulated subject (about 10 s) with 4 CMBs."""
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    return simulate_subject(5, SimulationConfig(n_cmbs=4))


def sphere_volume(shape=(40, 48, 56), centre=(20, 24, 28), radius=3.0, spacing=(1, 1, 1)):
    from CMBDetectorLib.engine.volume import Volume

    k, j, i = np.indices(shape)
    d2 = ((i - centre[2]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2 + \
        ((k - centre[0]) * spacing[2]) ** 2
    return Volume.from_arrays((d2 <= radius ** 2).astype(np.float32), spacing=spacing)
