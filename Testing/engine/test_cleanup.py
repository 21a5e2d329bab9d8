from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from CMBDetectorLib.engine.cleanup import edge_distance, shape_features, verdicts
from CMBDetectorLib.engine.settings import DetectionSettings


def test_sphere_round_tube_elongated_and_volume_in_mm3():
    lab = np.zeros((40, 40, 40), np.int32)
    k, j, i = np.indices(lab.shape)
    lab[(i - 10) ** 2 + (j - 10) ** 2 + (k - 10) ** 2 <= 9] = 1
    lab[((i - 30) ** 2 + (j - 30) ** 2 <= 1) & (k > 5) & (k < 35)] = 2
    vol, el = shape_features(lab, 2, (0.5, 0.5, 0.5))
    assert el[0] < 0.2 and el[1] > 0.8
    assert vol[0] == (lab == 1).sum() * 0.125


def test_anisotropic_voxels_do_not_fake_elongation():
    # A 6 mm ball sampled at 0.5 x 0.5 x 2 mm is still round in mm.
    sp = np.array([0.5, 0.5, 2.0])
    k, j, i = np.indices((12, 40, 40))
    ball = ((i - 20) * sp[0]) ** 2 + ((j - 20) * sp[1]) ** 2 + ((k - 6) * sp[2]) ** 2 <= 9
    _, el = shape_features(ball.astype(np.int32), 1, sp)
    assert el[0] < 0.3


def test_edge_distance_and_verdicts():
    mask = np.zeros((30, 30, 30), bool)
    mask[5:25, 5:25, 5:25] = True
    d = edge_distance(mask, np.array([[15, 15, 15], [6, 15, 15]]), (1, 1, 1))
    assert d[0] > d[1] and d[1] <= 2
    s = DetectionSettings()
    assert verdicts([1.0, 30, 30, 30, 1200], [0, 0, 0.9, 0, 0], [1, 30, 30, 30, 1200],
                    [10, 10, 10, 1, 10], s) == ["too small", "", "elongated", "brain edge",
                                                "too large"]


def test_a_10_mm_cmbs_component_is_not_too_large():
    """The detector's component reaches past a CMB's visible edge: 9.2 mm validation CMBs gave
    603-628 mm^3, which the old limit (525 mm^3, the CMB's own 10 mm sphere) removed."""
    s = DetectionSettings()
    assert verdicts([628.0, 1.5 * 524.0], [0.1, 0.1], [628, 786], [10, 10], s) == ["", ""]


def test_edge_distance_equals_the_distance_transform_at_every_voxel_kind():
    """Irregular mask, anisotropic voxels, centres inside, outside, at the array border and
    rounded from sub-voxel positions: the same values as the whole-volume transform."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    mask = ndi.gaussian_filter(rng.random((26, 30, 22)), 2.0) > 0.5
    mask[:, :, 0] = True  # the mask reaches the array border
    assert 0.2 < mask.mean() < 0.8
    spacing = (0.8, 1.1, 2.0)  # (i, j, k)
    centres = np.concatenate([rng.uniform(0, 1, (200, 3)) * (np.array(mask.shape) - 1),
                              [[0, 0, 0], [25, 29, 21], [13, 15, 0]]])
    ref = ndi.distance_transform_edt(mask, sampling=np.array(spacing)[::-1])
    idx = np.rint(centres).astype(int)
    expected = ref[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert (expected > 2.0).sum() > 10  # deep centres are part of the check
    np.testing.assert_allclose(edge_distance(mask, centres, spacing), expected, atol=1e-9)


def test_edge_distance_of_a_mask_without_outside_keeps_the_transforms_convention():
    from scipy import ndimage as ndi

    mask = np.ones((6, 7, 8), bool)
    c = np.array([[3.0, 3.0, 3.0]])
    np.testing.assert_array_equal(edge_distance(mask, c, (1, 1, 1)),
                                  ndi.distance_transform_edt(mask)[3:4, 3, 3])


def test_elongation_across_a_projection_ignores_the_stretch_along_it():
    """A 4 mm ball under a sliding maximum (the label of a dark focus under an mIP) of 4
    slices of 2 mm reads elongated; measured across the slice axis it is round, while a tube
    lying in the slice plane stays elongated."""
    sp = np.array([0.5, 0.5, 2.0])  # (i, j, k)
    k, j, i = np.indices((20, 40, 60))
    ball = ((i - 15) * sp[0]) ** 2 + ((j - 20) * sp[1]) ** 2 + ((k - 10) * sp[2]) ** 2 <= 4
    tube = (np.abs((j - 20) * sp[1]) <= 0.8) & (np.abs((k - 10) * sp[2]) <= 1) & (i > 30)
    lab = ndi.maximum_filter1d(ball.astype(np.int32) + 2 * tube, 4, axis=0)
    _, plain = shape_features(lab, 2, sp)
    _, across = shape_features(lab, 2, sp, across=(1.0, 0.0, 0.0))
    assert plain[0] > 0.5 and across[0] < 0.2
    assert across[1] > 0.75
