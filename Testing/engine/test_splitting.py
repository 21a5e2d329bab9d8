"""One candidate per focus: touching foci are split, a large round focus is not."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from CMBDetectorLib.engine.inference import extract_candidates
from CMBDetectorLib.engine.splitting import h_maxima, split_candidates


def _ball(shape, centre, radius):
    k, j, i = np.indices(shape)
    return ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= radius ** 2


def _prob(mask, peak=0.99, sigma=1.0):
    p = ndi.gaussian_filter(mask.astype(float), sigma) * peak
    return np.clip(p, 0, 1)


SPLIT = {"prob_h": 0.15, "shape_h_mm": 1.0, "min_separation_mm": 3.0}


def test_two_touching_foci_give_two_candidates_at_their_centres():
    shape = (40, 40, 40)
    a, b = (20, 20, 15), (20, 20, 24)  # 9 mm apart, radius 5: they overlap through a neck
    prob = _prob(_ball(shape, a, 5) | _ball(shape, b, 5))
    labels, voxels, pmax, centres = extract_candidates(prob, 0.3)
    assert len(centres) == 1  # whole components: one merged candidate between them
    labels, voxels, pmax, centres = extract_candidates(prob, 0.3, split=SPLIT)
    assert len(centres) == 2
    found = sorted(centres.tolist(), key=lambda c: c[2])
    assert np.allclose(found[0], a, atol=1.0) and np.allclose(found[1], b, atol=1.0)
    assert voxels.sum() == (prob > 0.3).sum()  # the split covers the whole component


def test_a_cmb_touching_a_fainter_vein_is_its_own_candidate():
    shape = (40, 40, 60)
    cmb = _ball(shape, (20, 20, 20), 3)
    vein = np.zeros(shape, bool)
    vein[19:22, 19:22, 20:58] = True  # a tube leaving the CMB
    prob = np.maximum(_prob(cmb, 0.99), _prob(vein, 0.55))
    _, _, _, whole = extract_candidates(prob, 0.3)
    assert len(whole) == 1 and abs(whole[0][2] - 20) > 5  # centroid dragged along the vein
    _, _, pmax, centres = extract_candidates(prob, 0.3, split=SPLIT)
    assert len(centres) == 2
    best = centres[np.argmax(pmax)]
    assert np.allclose(best, (20, 20, 20), atol=1.0)


def test_a_10_mm_focus_stays_one_candidate():
    shape = (40, 40, 40)
    rng = np.random.default_rng(0)
    prob = np.clip(_prob(_ball(shape, (20, 20, 20), 5), 0.99)
                   + 0.03 * rng.standard_normal(shape) * _ball(shape, (20, 20, 20), 5), 0, 1)
    _, _, _, centres = extract_candidates(prob, 0.3, split=SPLIT)
    assert len(centres) == 1
    assert np.allclose(centres[0], (20, 20, 20), atol=0.5)


def test_anisotropic_spacing_is_in_mm():
    shape = (20, 40, 40)  # 2 mm slices: the same physical dumbbell as above
    k, j, i = np.indices(shape)
    a = ((2 * (k - 10)) ** 2 + (j - 20) ** 2 + (i - 15) ** 2) <= 25
    b = ((2 * (k - 10)) ** 2 + (j - 20) ** 2 + (i - 24) ** 2) <= 25
    prob = _prob(a | b, sigma=(0.5, 1.0, 1.0))
    labels, n = ndi.label(prob > 0.3, np.ones((3, 3, 3)))
    _, m = split_candidates(prob, labels, n, (2.0, 1.0, 1.0), **SPLIT)
    assert m == 2


def test_h_maxima_ignore_shallow_bumps():
    x = np.zeros((1, 1, 9))
    x[0, 0] = [0, 0.5, 0.6, 0.55, 0.6, 0.5, 0, 0.9, 0]
    mask = x > 0
    peaks = h_maxima(x, 0.1, mask)
    assert peaks[0, 0].nonzero()[0].tolist() == [1, 2, 3, 4, 5, 7]  # one region + the 0.9
    labels, n = ndi.label(peaks)
    assert n == 2


def test_a_lone_vein_stays_one_candidate():
    shape = (20, 20, 60)
    vein = np.zeros(shape, bool)
    vein[9:12, 9:12, 5:55] = True
    _, _, _, centres = extract_candidates(_prob(vein, 0.6), 0.3, split=SPLIT)
    assert len(centres) == 1


def test_a_cmb_with_a_thin_rim_stays_one_candidate():
    """The opening shaves a thin flange off a lumpy focus; the flange is centred on the focus,
    so it is the same lesion (v23 showed such a focus as two lesions 1.4 mm apart)."""
    shape = (40, 40, 40)
    k, j, i = np.indices(shape)
    flange = (k == 20) & ((j - 20) ** 2 + (i - 20) ** 2 <= 5 ** 2)
    focus = _ball(shape, (20, 20, 20), 3) | flange
    prob = np.where(focus, 0.99, 0.0)
    _, _, _, centres = extract_candidates(prob, 0.3, split=SPLIT)
    assert len(centres) == 1
    assert np.allclose(centres[0], (20, 20, 20), atol=0.5)


def test_a_bump_on_a_large_focus_stays_with_it():
    """A thin plate on the surface of a 10 mm focus is shaved off by the opening and lies
    beyond the 3 mm merge distance; it does not reach beyond the focus, so it is the same
    lesion (v25 showed 4 such pieces as lesions that a gamma change made or unmade)."""
    shape = (40, 40, 40)
    focus = _ball(shape, (20, 20, 20), 5)
    focus[17:24, 17:24, 25:27] = True  # a 2-voxel plate on the surface (i = 25)
    prob = np.where(focus, 0.99, 0.0)
    labels, n = ndi.label(prob > 0.3, np.ones((3, 3, 3)))
    _, m = split_candidates(prob, labels, n, (1.0, 1.0, 1.0), **SPLIT)
    assert m == 1  # before 2026-12-06: 5 (the body and the plate's 4 corners, 9 voxels each)


def test_a_vein_leaving_a_large_focus_is_still_cut_off():
    shape = (40, 40, 60)
    focus = _ball(shape, (20, 20, 20), 5)
    vein = np.zeros(shape, bool)
    vein[19:21, 19:21, 20:40] = True  # 2 voxels thick: the opening removes it
    prob = np.where(focus | vein, 0.99, 0.0)
    labels, n = ndi.label(prob > 0.3, np.ones((3, 3, 3)))
    _, m = split_candidates(prob, labels, n, (1.0, 1.0, 1.0), **SPLIT)
    assert m == 2
