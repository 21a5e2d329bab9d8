"""An mIP found from the voxels alone: the axis, the slab, and nothing on acquired images."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from CMBDetectorLib.engine.projection import direction_in_grid, find_projection
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
