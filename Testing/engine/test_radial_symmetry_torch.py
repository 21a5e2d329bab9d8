"""The torch radial symmetry transform agrees with the numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

torch = pytest.importorskip("torch")

from CMBDetectorLib.engine.radial_symmetry import frst
from CMBDetectorLib.engine.radial_symmetry_torch import frst_torch, gaussian_filter


@pytest.mark.parametrize("sigma", [(0.5, 0.5, 0.5), (1.0, 0.25, 2.5), (0.0, 1.5, 0.7)])
def test_gaussian_matches_scipy_including_kernels_wider_than_the_axis(sigma):
    x = np.random.default_rng(0).normal(size=(3, 9, 40)).astype(np.float32)
    ours = gaussian_filter(torch.from_numpy(x), sigma).numpy()
    np.testing.assert_allclose(ours, ndi.gaussian_filter(x, sigma), atol=2e-6)


def _scan(shape=(30, 34, 28), seed=1):
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(size=shape), 1.2).astype(np.float32) * 2.0
    k, j, i = np.indices(shape)
    img += 1.5 * np.exp(-((k - 12) ** 2 + (j - 15) ** 2 + (i - 14) ** 2) / 4.0)  # a blob
    return img.astype(np.float32)


@pytest.mark.parametrize("spacing,radii", [((1.0, 1.0, 1.0), (1.0, 2.0, 3.0)),
                                           ((0.8, 0.8, 1.6), (1.0, 2.0, 3.0, 4.0, 5.0))])
def test_torch_transform_equals_the_numpy_one(spacing, radii):
    img = _scan()
    ref = frst(img, spacing_mm=spacing, radii_mm=radii)
    ours = frst_torch(img, spacing_mm=spacing, radii_mm=radii, device="cpu")
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert ref.max() > 0.05  # the blob votes
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_a_flat_image_has_no_voters_on_either_path():
    flat = np.ones((8, 9, 10), np.float32)
    assert not frst_torch(flat, device="cpu").any()
    assert not frst(flat).any()


def test_preparation_with_the_torch_transform_stays_within_1e_4(small_subject):
    from CMBDetectorLib.engine.preprocessing import prepare
    from CMBDetectorLib.engine.settings import DetectionSettings

    vol = small_subject.images["swi"]
    numpy_prep = prepare(vol, "swi", None, DetectionSettings())
    torch_prep = prepare(vol, "swi", None, DetectionSettings(), device="cpu")
    np.testing.assert_array_equal(torch_prep.image, numpy_prep.image)
    np.testing.assert_array_equal(torch_prep.mask, numpy_prep.mask)
    assert numpy_prep.frst.max() > 0.01
    np.testing.assert_allclose(torch_prep.frst, numpy_prep.frst, atol=1e-4)
