"""Per-patch standardisation: a local gain and offset of the raw scan cancel by construction."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from CMBDetectorLib.engine.inference import score_candidates
from CMBDetectorLib.engine.networks import (PatchStandardise, Student, Teacher, build,
                                            for_inference)


def _patches(n=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 0.08, (n, 1, size, size, size)).astype(np.float32)
    img[:, :, 5:8, 5:8, 5:8] += 1.0  # a focus at the centre
    img[:, :, :, :, :2] = 0.0        # outside the brain
    frst = np.abs(img) * 0.5
    return torch.from_numpy(np.concatenate([img, frst], 1))


def test_a_local_gain_and_offset_give_the_same_standardised_patch():
    x = _patches()
    inside = x[:, :1] != 0
    y = x.clone()
    gain, shift = 1.25, 0.2
    y[:, :1] = torch.where(inside, gain * x[:, :1] + shift, x[:, :1])
    y[:, 1:] = gain * x[:, 1:]
    std = PatchStandardise()
    assert torch.allclose(std(x), std(y), atol=1e-4)
    assert not torch.allclose(x, y)


def test_outside_the_brain_stays_zero_and_the_tissue_median_goes_to_zero():
    x = _patches()
    out = PatchStandardise()(x)
    assert torch.all(out[:, 0][x[:, 0] == 0] == 0)
    med = [float(o[0][x[n, 0] != 0].median()) for n, o in enumerate(out)]
    assert np.allclose(med, 0.0, atol=0.02)
    empty = torch.zeros(1, 2, 8, 8, 8)
    assert torch.equal(PatchStandardise()(empty), empty)  # no brain: nothing to scale


def test_patch_norm_is_in_the_config_and_old_weights_load():
    plain, normed = Student(2, 4, 8), Student(2, 4, 8, patch_norm=True)
    assert "patch_norm" not in plain.config and normed.config["patch_norm"] is True
    normed.load_state_dict(plain.state_dict())  # no parameters of its own
    again = build("Student", normed.config)
    assert isinstance(again.standardise, PatchStandardise)
    assert isinstance(Teacher(2, 4, 8, patch_norm=True).standardise, PatchStandardise)


def test_a_patch_norm_student_scores_a_gain_changed_scan_alike():
    torch.manual_seed(0)
    net = for_inference(Student(2, 4, 8, patch_norm=True))
    rng = np.random.default_rng(1)
    img = rng.normal(0, 0.08, (32, 32, 32)).astype(np.float32)
    img[14:18, 14:18, 14:18] += 1.0
    chans = np.stack([img, np.abs(img)])
    centres = np.array([[16.0, 16.0, 16.0], [8.0, 24.0, 10.0]])
    a = score_candidates(net, chans, centres, 12)
    b = score_candidates(net, np.stack([1.2 * img + 0.1, 1.2 * np.abs(img)]), centres, 12)
    assert np.allclose(a, b, atol=1e-4)
