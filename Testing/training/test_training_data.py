from __future__ import annotations

import numpy as np

from CMBDetectorLib.training.data import Case, mimic_negatives


def _case_with_u_vein():
    shape = (20, 40, 40)
    mimics = np.zeros(shape, np.uint16)
    # A U-shaped vein: two legs and a bottom; its centre of mass lies in the empty middle.
    mimics[10, 5:30, 5] = 1
    mimics[10, 5:30, 30] = 1
    mimics[10, 30, 5:31] = 1
    mimics[3, 3, 3] = 2          # a calcification (one voxel)
    labels = np.zeros(shape, np.uint16)
    labels[10, 29, 18] = 1       # a CMB right on the vein's bottom
    grid = np.eye(4)
    return Case("u", "swi", grid, np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                np.ones(shape, bool), labels, mimics, {1: "vein", 2: "calcification"},
                np.array([[10.0, 29.0, 18.0]]))


def test_vein_negatives_lie_on_the_vein_and_away_from_cmbs():
    case = _case_with_u_vein()
    on_vein = 0
    for seed in range(20):
        pts = mimic_negatives(case, np.random.default_rng(seed))
        assert len(pts) >= 1
        for p in pts:
            assert np.linalg.norm(p - case.truth_centres[0]) >= 3.0
            k, j, i = np.rint(p).astype(int)
            on_vein += int(case.mimics[k, j, i] == 1)
    # The centre of mass is off the vein, so on-vein points come from sampling along it.
    com = np.argwhere(case.mimics == 1).mean(0)
    assert case.mimics[tuple(np.rint(com).astype(int))] == 0
    assert on_vein >= 20


def test_no_mimics_no_negatives():
    case = _case_with_u_vein()
    case.mimics[:] = 0
    assert mimic_negatives(case, np.random.default_rng(0)).shape == (0, 3)


def _case_with_two_cmbs():
    """A 40^3 brain (mask 3 voxels in from every face) with one CMB 1 mm inside the mask edge
    and one deep CMB."""
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    labels = np.zeros(shape, np.uint16)
    labels[20, 20, 4] = 1        # surface
    labels[20, 20, 20] = 2       # deep
    return Case("s", "swi", np.eye(4), mask.astype(np.float32), np.zeros(shape, np.float32),
                mask, labels, np.zeros(shape, np.uint16), {},
                np.array([[20.0, 20.0, 4.0], [20.0, 20.0, 20.0]]))


def test_surface_cmbs_get_extra_detector_patches():
    from CMBDetectorLib.training.data import detector_patches

    case = _case_with_two_cmbs()
    _, labs0, kinds0 = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2)
    _, labs, kinds = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2,
                                      surface_mm=5.0, surface_extra=3)
    assert (kinds0 == 1).sum() == 2
    assert (kinds == 1).sum() == 5          # 2 + 3 for the surface CMB only
    # The extra positive patches hold the surface CMB (jitter is at most 12 of 16 voxels).
    assert all(l.any() for l in labs[kinds == 1][2:])
    _, _, kinds_deep = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2,
                                        surface_mm=0.5, surface_extra=3)
    assert (kinds_deep == 1).sum() == 2     # no CMB lies within 0.5 mm of the edge


def test_cmbs_in_bright_context_get_extra_detector_patches():
    from CMBDetectorLib.training.data import bright_context, detector_patches

    case = _case_with_two_cmbs()
    case.image[:] = 0.0
    case.image[18:23, 18:23, 22:26] = 1.0    # a dark (bright after inversion) band beside CMB 2
    case.labels[20, 20, 20] = 2
    assert bright_context(case, 0) == 0.0
    assert bright_context(case, 1) > 0.15
    _, labs, kinds = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2,
                                      context_extra=3)
    assert (kinds == 1).sum() == 5          # 2 + 3 for the CMB in bright context
    assert all(l.any() for l in labs[kinds == 1][2:])


def test_large_cmbs_get_extra_detector_patches():
    from CMBDetectorLib.training.data import detector_patches

    case = _case_with_two_cmbs()
    case.labels[18:23, 18:23, 18:23] = 2     # the deep CMB: 125 voxels; the surface one: 1
    _, labs, kinds = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2,
                                      large_voxels=40, large_extra=3)
    assert (kinds == 1).sum() == 5          # 2 + 3 for the large CMB only
    assert all(l.any() for l in labs[kinds == 1][2:])
    _, _, kinds_off = detector_patches(case, np.random.default_rng(0), size=32, n_rand=2,
                                       large_voxels=200, large_extra=3)
    assert (kinds_off == 1).sum() == 2      # no CMB has 200 voxels


def test_typed_mimic_negatives_are_the_same_draws_with_their_types():
    from CMBDetectorLib.training.data import typed_mimic_negatives

    case = _case_with_u_vein()
    for seed in range(5):
        pts, types = typed_mimic_negatives(case, np.random.default_rng(seed))
        assert np.array_equal(pts, mimic_negatives(case, np.random.default_rng(seed)))
        assert len(types) == len(pts)
        for p, t in zip(pts, types):
            label = case.mimics[tuple(np.rint(p).astype(int))]
            if label:  # a point on a mimic carries that mimic's type
                assert t == case.mimic_types[int(label)]
        assert "calcification" in types


def test_discriminator_patches_carry_their_kind():
    from CMBDetectorLib.training.data import PATCH_KINDS, discriminator_patches

    case = _case_with_u_vein()
    table = {"centres": np.array([[10.0, 29.0, 18.0], [3.0, 3.0, 3.0], [15.0, 20.0, 20.0]]),
             "pmax": np.array([0.9, 0.8, 0.7]), "is_cmb": np.array([True, False, False]),
             "mimic": ["", "calcification", ""]}
    x, seg, cls, kind = discriminator_patches(case, table, np.random.default_rng(0), size=8)
    assert len(x) == len(seg) == len(cls) == len(kind)
    names = [PATCH_KINDS[k] for k in kind]
    # candidates first (the CMB, then negatives by probability), then the true centre, then mimics
    assert names[:4] == ["cmb", "calcification", "other", "cmb"]
    assert list(cls[:4]) == [1, 0, 0, 1]
    assert set(names[4:]) <= {"vein", "calcification"} and "vein" in names[4:]
    assert all((c == 1) == (n == "cmb") for c, n in zip(cls, names))
