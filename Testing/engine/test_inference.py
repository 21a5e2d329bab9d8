from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from CMBDetectorLib.engine.inference import (MIRRORS, extract_candidates, extract_patches,
                                      fitted_tile, predict_volume, score_candidates,
                                      tile_starts)
from CMBDetectorLib.engine.networks import Student, Teacher, UNet3D, count_parameters


def test_tile_starts_cover_with_overlap():
    s = tile_starts(100, 40, 10)
    assert s[0] == 0 and s[-1] == 60
    assert all(b - a <= 30 for a, b in zip(s, s[1:]))
    assert tile_starts(30, 40, 10) == [0]


@pytest.mark.parametrize("length,tile,overlap", [(155, 192, 29), (184, 128, 19), (300, 128, 19),
                                                 (129, 128, 19), (500, 96, 24)])
def test_fitted_tiles_are_as_few_and_small_as_possible(length, tile, overlap):
    size = fitted_tile(length, tile, overlap)
    starts = tile_starts(length, size, overlap)
    assert size <= tile and starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # covered, overlapping
    assert len(starts) == len(tile_starts(length, tile, overlap))           # no extra tile
    if len(starts) > 1:                                                     # one voxel less fails
        assert (length + (len(starts) - 1) * overlap) > len(starts) * (size - 1)


def test_a_volume_within_one_tile_runs_whole():
    torch.manual_seed(0)
    net = UNet3D(2, 4).eval()
    x = np.random.default_rng(1).normal(0, 1, (2, 20, 24, 28)).astype(np.float32)
    with torch.no_grad():
        direct = torch.softmax(net(torch.from_numpy(x[None])), 1)[0, 1].numpy()
    np.testing.assert_array_equal(predict_volume(net, x, tile=28), direct)


def test_the_default_tile_runs_the_longest_training_brain_whole():
    """The training and validation brains reach 208 working-grid voxels front to back: the
    default tile must run them in one pass (tiles cost time and change the prediction)."""
    from CMBDetectorLib.engine.settings import DetectionSettings

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(tuple(x.shape[2:]))
            return torch.zeros((1, 2) + tuple(x.shape[2:]))

    x = np.zeros((2, 6, 208, 6), np.float32)
    predict_volume(Counting(), x, DetectionSettings().tile_size)
    assert calls == [(6, 208, 6)]
    calls.clear()
    predict_volume(Counting(), x, 192)  # the old default split it in two
    assert len(calls) == 2


def test_sliding_window_has_no_seams():
    torch.manual_seed(0)
    net = UNet3D(2, 4).eval()
    x = np.random.default_rng(0).normal(0, 1, (2, 40, 44, 48)).astype(np.float32)
    whole = predict_volume(net, x, tile=64)
    tiled = predict_volume(net, x, tile=28, overlap=0.4)
    assert np.abs(whole - tiled).max() < 0.02


def test_candidates_are_26_connected_with_max_probability():
    p = np.zeros((10, 10, 10), np.float32)
    p[2, 2, 2] = 0.9
    p[3, 3, 3] = 0.6        # diagonal neighbour: same component
    p[7, 7, 7] = 0.5
    lab, vox, pmax, cen = extract_candidates(p, 0.3)
    assert lab.max() == 2 and sorted(vox.tolist()) == [1, 2]
    np.testing.assert_allclose(sorted(pmax), [0.5, 0.9], atol=1e-6)


def test_patches_stay_centred_at_the_border():
    vol = np.zeros((1, 20, 20, 20), np.float32)
    vol[0, 0, 19, 1] = 5.0
    p = extract_patches(vol, np.array([[0, 19, 1]]), 24)
    assert p[0, 0, 12, 12, 12] == 5.0 and p.shape == (1, 1, 24, 24, 24)


def test_student_is_at_most_a_third_of_the_teacher_and_any_patch_size_works():
    t, s = Teacher(base=16, hidden=64), Student(base=8, hidden=32)
    assert count_parameters(s) <= count_parameters(t) / 3
    s.eval()
    for size in (20, 24, 32):
        assert s(torch.zeros(2, 2, size, size, size)).shape == (2, 2)


def test_unet_keeps_odd_shapes():
    net = UNet3D(2, 4).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 2, 17, 22, 13)).shape == (1, 2, 17, 22, 13)


def test_mirrored_scoring_is_the_mean_over_the_eight_mirror_images():
    torch.manual_seed(1)
    net = Student(base=4, hidden=8).eval()
    vol = np.random.default_rng(1).normal(0, 1, (2, 30, 30, 30)).astype(np.float32)
    centres = np.array([[15.0, 14.0, 16.0], [10.0, 20.0, 12.0]])
    patches = torch.from_numpy(extract_patches(vol, centres, 24))
    with torch.no_grad():
        views = [torch.softmax(net(torch.flip(patches, d) if d else patches), 1)[:, 1]
                 for d in MIRRORS]
    assert len(set(MIRRORS)) == 8
    mirrored = score_candidates(net, vol, centres, 24, batch_size=1)
    plain = score_candidates(net, vol, centres, 24, mirrored=False)
    np.testing.assert_allclose(mirrored, torch.stack(views).mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(plain, views[0].numpy(), atol=1e-6)
    assert np.abs(mirrored - plain).max() > 1e-6  # the views do differ


def _trained_looking(net, seed=0):
    """Random weights and non-trivial batch-norm statistics (a fresh BatchNorm is the
    identity, which would let a wrong fusion pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()


@pytest.mark.parametrize("make", [lambda: UNet3D(2, 4), lambda: Student(2, 4, 8)])
def test_inference_form_computes_the_same_function_without_batch_norm(make):
    import copy

    from CMBDetectorLib.engine.inference import as_input
    from CMBDetectorLib.engine.networks import for_inference

    torch.manual_seed(0)
    net = _trained_looking(make())
    fast = for_inference(copy.deepcopy(net))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = torch.randn(2, 2, 20, 22, 18, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = net(x), fast(as_input(fast, x))
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 1e-4
    assert float(ref.abs().max()) > 0.01  # a real output, not zeros on both sides


def test_batch_norm_is_folded_only_in_eval_mode():
    from CMBDetectorLib.engine.networks import fuse_batchnorm

    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(UNet3D(2, 4).train())


def test_the_probability_map_of_the_inference_form_matches_and_is_c_contiguous():
    import copy

    from CMBDetectorLib.engine.networks import for_inference

    net = _trained_looking(UNet3D(2, 4), seed=2)
    x = np.random.default_rng(0).normal(size=(2, 24, 20, 28)).astype(np.float32)
    ref = predict_volume(net, x, tile=192)
    fast = predict_volume(for_inference(copy.deepcopy(net)), x, tile=192)
    assert fast.flags.c_contiguous and fast.shape == ref.shape
    assert np.abs(fast - ref).max() < 1e-5


def test_label_statistics_equal_scipys_on_a_random_map():
    from scipy import ndimage as ndi

    from CMBDetectorLib.engine.inference import STRUCTURE_26, label_statistics

    rng = np.random.default_rng(4)
    prob = ndi.gaussian_filter(rng.random((30, 26, 34)), 1.5).astype(np.float32)
    binary = prob > np.quantile(prob, 0.9)
    labels, n = ndi.label(binary, STRUCTURE_26)
    labels[labels == 2] = 0  # a label may leave part of the thresholded map out
    assert n > 3
    counts, pmax, centroids = label_statistics(prob, binary, labels, n)
    idx = np.arange(1, n + 1)
    kept = idx != 2
    np.testing.assert_array_equal(counts[kept], ndi.sum_labels(binary, labels, idx)[kept])
    np.testing.assert_array_equal(pmax[kept], ndi.maximum(prob, labels, idx)[kept])
    with np.errstate(invalid="ignore"):  # scipy divides by zero for the emptied label
        reference = np.array(ndi.center_of_mass(prob * binary, labels, idx))
    np.testing.assert_allclose(centroids[kept], reference[kept], rtol=0, atol=1e-9)
