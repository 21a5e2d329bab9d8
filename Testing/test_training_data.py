from __future__ import annotations

import numpy as np

from CMBDetectorLib.training_data import Case, mimic_negatives


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
