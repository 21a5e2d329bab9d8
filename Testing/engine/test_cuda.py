"""Same results on every device: detection with the networks on CUDA agrees with the CPU.

Needs a working CUDA device; CI has none, so every test here is skipped with the reason.
``Testing/device/device_check.sh`` runs this file on a lent GPU machine. The CUDA
fallbacks (out of memory, an unusable card) are tested on the CPU in ``test_detection.py`` and
``test_models.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from CMBDetectorLib import MODALITIES
from CMBDetectorLib.engine.models import cuda_problem, load_bundle, select_device


def _why_no_cuda() -> str:
    """Why these tests cannot run here ("" when they can)."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return cuda_problem() or ""


NO_CUDA = _why_no_cuda()
pytestmark = pytest.mark.skipif(bool(NO_CUDA), reason=f"needs a working CUDA device: {NO_CUDA}")

CENTROID_MM = 0.1      # same lesion: centroids this close
CONFIDENCE = 0.01      # student probabilities this close
PROBABILITY = 1e-3     # detector probability maps this close


def match(a: list, b: list) -> list:
    """Pairs ``(ca, cb, distance_mm)``: each candidate of ``a`` with the nearest of ``b``."""
    if not a or not b:
        return []
    pa = np.array([c.centroid_ras for c in a])
    pb = np.array([c.centroid_ras for c in b])
    d = np.linalg.norm(pa[:, None] - pb[None], axis=2)
    return [(a[n], b[int(d[n].argmin())], float(d[n].min())) for n in range(len(a))]


@pytest.fixture(scope="module")
def bundles():
    """The bundled models, once on each device."""
    return {device: load_bundle(device=device) for device in ("cpu", "cuda")}


def _detect(subject, modality: str, bundle, device: str):
    from CMBDetectorLib.engine.detection import default_settings, detect

    settings = default_settings(bundle, device=device)
    return detect(subject.images[modality], modality, settings=settings, models=bundle)


@pytest.fixture(scope="module", params=MODALITIES)
def results(request, small_subject, bundles):
    """``(cpu_result, cuda_result)`` of detect() on one modality of the small subject."""
    m = request.param
    return tuple(_detect(small_subject, m, bundles[d], d) for d in ("cpu", "cuda"))


def test_networks_ran_where_asked(results):
    cpu, cuda = results
    assert (cpu.device, cuda.device) == ("cpu", "cuda")
    assert cuda.device_name and not cuda.warnings


def test_same_candidates_and_confidences(results):
    cpu, cuda = results
    assert cpu.candidates, "the small subject should give candidates to compare"
    assert len(cuda.candidates) == len(cpu.candidates)
    pairs = match(cpu.candidates, cuda.candidates)
    assert len({id(cb) for _, cb, _ in pairs}) == len(pairs), "two CPU candidates, one on CUDA"
    for ca, cb, dist in pairs:
        assert dist <= CENTROID_MM, f"candidate {ca.index} moved {dist:.3f} mm on CUDA"
        assert abs(ca.confidence - cb.confidence) <= CONFIDENCE, (ca.confidence, cb.confidence)
        assert ca.kept == cb.kept and ca.reason == cb.reason


def test_same_lesion_set(results):
    cpu, cuda = results
    a, b = cpu.lesions(), cuda.lesions()
    assert len(a) == len(b)
    assert all(dist <= CENTROID_MM for _, _, dist in match(a, b))


def _channels(subject, modality: str):
    from CMBDetectorLib.engine.detection import prepare_scan

    return prepare_scan(subject.images[modality], modality).channels


def test_detector_probability_maps_agree(small_subject, bundles):
    from CMBDetectorLib.engine.inference import predict_volume

    channels = _channels(small_subject, "swi")
    cpu, cuda = (predict_volume(bundles[d].detector, channels) for d in ("cpu", "cuda"))
    assert cpu.shape == cuda.shape and cpu.max() > 0.5
    assert float(np.abs(cpu - cuda).max()) <= PROBABILITY


def test_student_scores_agree_on_the_same_patches(small_subject, bundles):
    from CMBDetectorLib.engine.inference import score_candidates

    channels = _channels(small_subject, "gre")
    rng = np.random.default_rng(0)
    centres = rng.uniform(12, np.array(channels.shape[1:]) - 12, size=(32, 3))
    cpu, cuda = (score_candidates(bundles[d].student, channels, centres) for d in ("cpu", "cuda"))
    assert float(np.abs(cpu - cuda).max()) <= PROBABILITY


def test_tf32_is_off_once_cuda_is_selected():
    """TF32 rounds convolutions to 10 mantissa bits; choosing CUDA must turn it off."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = True, True
        assert select_device("cuda").type == "cuda"
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_the_radial_symmetry_transform_on_cuda_equals_the_numpy_one(small_subject):
    """Detection on a GPU computes the FRST there (``prepare(..., device)``): the prepared
    image is the CPU's and the FRST within 1e-4, so the bundled models need no retraining."""
    from CMBDetectorLib.engine.preprocessing import prepare
    from CMBDetectorLib.engine.settings import DetectionSettings

    vol = small_subject.images["gre"]
    cpu = prepare(vol, "gre", None, DetectionSettings())
    gpu = prepare(vol, "gre", None, DetectionSettings(), device=torch.device("cuda"))
    np.testing.assert_array_equal(gpu.image, cpu.image)
    assert cpu.frst.max() > 0.01
    np.testing.assert_allclose(gpu.frst, cpu.frst, atol=1e-4)
