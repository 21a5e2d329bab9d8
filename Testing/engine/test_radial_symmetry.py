from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib.engine.radial_symmetry import frst, frst_loop


def _blob(shape=(30, 32, 34), centre=(15, 14, 18), sigma=1.5, spacing=(1, 1, 1), sign=1.0):
    k, j, i = np.indices(shape).astype(float)
    d2 = ((i - centre[2]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2 + \
        ((k - centre[0]) * spacing[2]) ** 2
    return (sign * np.exp(-d2 / (2 * sigma ** 2))).astype(np.float32)


def test_peak_at_bright_blob_centre():
    f = frst(_blob())
    assert np.unravel_index(np.argmax(f), f.shape) == (15, 14, 18)


def test_dark_blob_gives_no_bright_response():
    assert frst(_blob(sign=-1.0)).max() < 0.1 * frst(_blob()).max()


def test_anisotropic_spacing_in_mm():
    sp = (0.5, 0.5, 2.0)
    img = _blob(shape=(16, 40, 40), centre=(8, 20, 21), sigma=2.0, spacing=sp)
    f = frst(img, spacing_mm=sp, radii_mm=(1.0, 2.0, 3.0))
    assert np.unravel_index(np.argmax(f), f.shape) == (8, 20, 21)


def test_float_input_in_unit_range_is_not_truncated():
    # The reference code cast gradients to int: a [0, 1] image produced all zeros.
    img = _blob() * 0.5
    assert frst(img).max() > 0


def test_vectorised_equals_per_voxel_loop():
    img = _blob(shape=(14, 15, 16), centre=(7, 7, 8)) + \
        np.random.default_rng(0).normal(0, 0.02, (14, 15, 16)).astype(np.float32)
    np.testing.assert_allclose(frst(img), frst_loop(img), atol=1e-5)


def test_flat_image_is_zero():
    assert not frst(np.ones((10, 10, 10), np.float32)).any()
