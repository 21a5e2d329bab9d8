"""An mIP found from the voxels alone: the axis, the slab, and nothing on acquired images."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from CMBDetectorLib.engine.projection import (as_detected, direction_in_grid, find_projection,
                                             find_reversal, reverse_projection)
from CMBDetectorLib.engine.volume import Volume


def _scan(seed=0, shape=(30, 48, 48)):
    """A smooth positive 'tissue' with noise, like a magnitude image ([k, j, i])."""
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.normal(size=shape), 3)
    return (100 + 400 * (smooth - smooth.min()) + rng.normal(0, 5, shape)).astype(np.float32)


def _oblique(array):
    spacing = (0.5, 0.6, 2.0)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return Volume.from_arrays(array, spacing, (10.0, -5.0, 3.0), direction)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_sliding_minimum_over_slices_is_found_with_its_axis_and_slab(n):
    vol = _oblique(ndi.minimum_filter1d(_scan(), n, axis=0))  # along k
    p = find_projection(vol)
    assert p is not None and p.axis_ijk == 2 and p.n_slices == n
    column = vol.ijk_to_ras[:3, 2] / np.linalg.norm(vol.ijk_to_ras[:3, 2])
    np.testing.assert_allclose(p.direction_ras, column, atol=1e-12)


def test_the_axis_follows_the_array_and_a_monotone_change_keeps_it():
    mip = ndi.minimum_filter1d(_scan(1), 4, axis=2)  # along i
    p = find_projection(Volume.from_arrays(mip))
    assert p is not None and p.axis_ijk == 0 and p.n_slices == 4
    gamma = (mip / mip.max()) ** 0.7 * 3000.0  # another scanner's gain and curve
    q = find_projection(Volume.from_arrays(gamma))
    assert q is not None and (q.axis_ijk, q.n_slices) == (0, 4)


def test_acquired_images_are_not_projections_even_as_integers():
    assert find_projection(_oblique(_scan(2))) is None
    quantised = np.rint(_scan(3) / 8.0).astype(np.int16)  # coarse integer storage
    assert find_projection(Volume.from_arrays(quantised)) is None
    background = _scan(4)
    background[:, :, :10] = -1024  # a constant fill outside the head
    assert find_projection(Volume.from_arrays(background)) is None
    assert find_projection(Volume.from_arrays(np.zeros((10, 10, 10), np.float32))) is None


def test_interpolating_an_mip_onto_another_grid_hides_it():
    mip = ndi.minimum_filter1d(_scan(5), 3, axis=0)
    shifted = ndi.shift(mip, (0.37, 0.21, 0.0), order=1, mode="nearest")
    assert find_projection(Volume.from_arrays(shifted)) is None


def test_direction_in_grid_is_in_kji_millimetres():
    grid = Volume.from_arrays(np.zeros((4, 5, 6)), (1.0, 2.0, 3.0))
    np.testing.assert_allclose(direction_in_grid((0, 0, 1), grid), (1, 0, 0), atol=1e-12)
    np.testing.assert_allclose(direction_in_grid((1, 0, 0), grid), (0, 0, 1), atol=1e-12)
    tilted = direction_in_grid((0, np.sqrt(0.5), np.sqrt(0.5)), grid)
    np.testing.assert_allclose(tilted, (np.sqrt(0.5), np.sqrt(0.5), 0), atol=1e-12)


def test_a_simulated_mip_is_found_along_the_working_grids_k_axis():
    """The simulator projects an SWI along its slice axis; the engine finds it there, with the
    simulator's slab, and on the working grid (which keeps the scan's orientation) the axis is
    the grid's k, the axis the training runs' candidate tables assume
    (``Run.projection_axis``)."""
    from CMBDetectorLib.engine.preprocessing import prepare
    from CMBDetectorLib.engine.settings import DetectionSettings
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    sub = simulate_subject(4243, SimulationConfig(roi_mm=48.0, spacing_mm=(0.9, 0.9, 1.6),
                                                  n_cmbs=1, swi_mip=3))
    swi = sub.images["swi"]
    p = find_projection(swi)
    assert p is not None and (p.axis_ijk, p.n_slices) == (2, 3)
    assert find_projection(sub.images["gre"]) is None
    prep = prepare(swi, "swi", None, DetectionSettings())
    u = direction_in_grid(p.direction_ras, prep.grid)
    np.testing.assert_allclose(np.abs(u), (1.0, 0.0, 0.0), atol=1e-6)


def _with_ball(seed=6, value=10.0):
    """A scan with one dark ball (radius 3 voxels) in the middle, and the ball's mask."""
    scan = _scan(seed)
    k, j, i = np.mgrid[:30, :48, :48]
    ball = (k - 15) ** 2 + (j - 24) ** 2 + (i - 24) ** 2 <= 9
    scan[ball] = value
    return scan, ball


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_a_sliding_minimum_is_found_and_reversed_to_the_ball(n):
    scan, ball = _with_ball()
    mip = ndi.minimum_filter1d(scan, n, axis=0, mode="nearest")  # centred, like the simulator
    assert (mip < 50).sum() > ball.sum()  # the projection stretched it along k
    p = find_projection(_oblique(mip))
    assert (p.kind, p.unchanged_fraction, p.reversible) == ("minimum", 1.0, True)
    back = reverse_projection(_oblique(mip), p)
    np.testing.assert_array_equal(back.array < 50, ball)
    np.testing.assert_array_equal(back.ijk_to_ras, _oblique(mip).ijk_to_ras)


def test_a_slab_that_starts_at_its_slice_comes_back_at_the_streaks_centre():
    """Where the slab sat cannot be read from the voxels: the ball comes back whole, moved
    to the middle of the streak the mIP shows (one slice for a 3-slice slab)."""
    scan, ball = _with_ball(11)
    mip = ndi.minimum_filter1d(scan, 3, axis=0, mode="nearest", origin=-1)  # slices k..k+2
    p = find_projection(Volume.from_arrays(mip))
    back = reverse_projection(Volume.from_arrays(mip), p).array
    np.testing.assert_array_equal(back < 50, np.roll(ball, -1, axis=0))


def test_integer_storage_and_a_gamma_do_not_hide_the_reversal():
    scan, ball = _with_ball(7)
    mip = ndi.minimum_filter1d(scan, 3, axis=1, mode="nearest")  # along j
    stored = np.rint((mip / mip.max()) ** 0.8 * 4000).astype(np.int16)
    p = find_projection(Volume.from_arrays(stored))
    assert (p.axis_ijk, p.n_slices, p.kind) == (1, 3, "minimum")
    back = reverse_projection(Volume.from_arrays(stored), p).array
    assert back.dtype == np.int16
    threshold = np.rint((50 / mip.max()) ** 0.8 * 4000)
    np.testing.assert_array_equal(back < threshold, ball)


def test_a_sliding_maximum_is_reversed_by_the_minimum():
    scan, ball = _with_ball(8, value=900.0)  # a bright focus, as on QSM
    mip = ndi.maximum_filter1d(scan, 4, axis=0, mode="nearest")
    p = find_projection(Volume.from_arrays(mip))
    assert (p.kind, p.n_slices) == ("maximum", 4)
    assert "maximum-intensity projection (MIP)" in p.note(False, True)
    back = reverse_projection(Volume.from_arrays(mip), p).array
    np.testing.assert_array_equal(back > 800, ball)


def test_repeated_slices_are_flagged_but_not_reversed():
    """Nearest-neighbour upsampling along k repeats each slice: both an erosion and a dilation
    explain it, so nothing says which to undo (undoing either would thin every lesion)."""
    repeated = np.repeat(_scan(9, shape=(15, 48, 48)), 2, axis=0)
    p = find_projection(Volume.from_arrays(repeated))
    assert p is not None and not p.reversible and p.unchanged_fraction == 1.0
    with pytest.raises(ValueError):
        reverse_projection(Volume.from_arrays(repeated), p)


def test_find_reversal_needs_a_projection_and_tissue():
    kind, share = find_reversal(_scan(10), 0, 3)  # an acquired image: no slab explains it
    assert kind == "" and share < 0.999
    assert find_reversal(np.zeros((8, 8, 8), np.float32), 0, 3) == ("", 0.0)


def test_as_detected_gives_the_projection_and_the_image_the_networks_see():
    scan, ball = _with_ball(12)
    mip = Volume.from_arrays(ndi.minimum_filter1d(scan, 3, axis=0))
    p, image = as_detected(mip)
    assert p.reversible and np.array_equal(image.array < 50, ball)
    p_off, same = as_detected(mip, reverse=False)
    assert same is mip and p_off == p
    plain = Volume.from_arrays(scan)
    assert as_detected(plain) == (None, plain)
