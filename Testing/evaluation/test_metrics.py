"""Metrics on hand-built tiny volumes whose correct answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from CMBDetectorLib.evaluation import metrics as M
from CMBDetectorLib.engine.volume import Volume


def blob(shape, centre_kji, r=1):
    a = np.zeros(shape, np.uint8)
    k, j, i = centre_kji
    a[max(k - r, 0):k + r + 1, max(j - r, 0):j + r + 1, max(i - r, 0):i + r + 1] = 1
    return a


SHAPE = (20, 20, 20)


def test_any_overlap_merged_prediction_detects_both_references():
    ref = blob(SHAPE, (5, 5, 5)) | blob(SHAPE, (5, 5, 9))  # two separate 3^3 cubes
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 5, 4:11] = 1  # one bar touching both
    c = M.cluster_counts(pred, ref)
    assert (c.n_ref, c.n_pred, c.tp, c.fn, c.tp_pred, c.fp) == (2, 1, 2, 0, 1, 0)
    assert c.tpr == 1.0 and c.precision == 1.0
    one = M.cluster_counts(pred, ref, one_to_one=True)
    assert (one.tp, one.fn, one.fp) == (1, 1, 0)
    # VALDO: the merged blob's centroid (i=7) is 2 mm from both; one TP, one FN
    v = M.valdo_subject(pred, ref, np.eye(4))
    assert (v.tp, v.fn, v.fp) == (1, 1, 0)
    assert v.f1 == pytest.approx(2 / 3)


def test_split_prediction_any_vs_one_to_one_vs_valdo():
    ref = np.zeros(SHAPE, np.uint8)
    ref[5, 5, 3:12] = 1  # one elongated reference
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 5, 3] = 1
    pred[5, 5, 11] = 1  # two fragments, 4 mm either side of the centre
    c = M.cluster_counts(pred, ref)
    assert (c.tp, c.fn, c.tp_pred, c.fp) == (1, 0, 2, 0)
    one = M.cluster_counts(pred, ref, one_to_one=True)
    assert (one.tp, one.fn, one.fp) == (1, 0, 1)
    v = M.valdo_subject(pred, ref, np.eye(4))
    assert (v.tp, v.fn, v.fp) == (1, 0, 1)  # both claim it; equal distance -> one TP, one FP
    assert v.count_difference == 1


def test_false_positive_and_missed_reference():
    ref = blob(SHAPE, (5, 5, 5)) | blob(SHAPE, (15, 15, 15))
    pred = blob(SHAPE, (5, 5, 5), r=0) | blob(SHAPE, (5, 15, 15), r=0)
    c = M.cluster_counts(pred, ref)
    assert (c.tp, c.fn, c.fp) == (1, 1, 1)


def test_connectivity_changes_component_count():
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 5, 5] = pred[6, 6, 6] = 1  # touch by a corner only
    assert M.label_components(pred, 26)[1] == 1
    assert M.label_components(pred, 6)[1] == 2
    with pytest.raises(ValueError):
        M.label_components(pred, 8)


def test_empty_reference_gives_nan_f1_and_fp():
    ref = np.zeros(SHAPE, np.uint8)
    pred = blob(SHAPE, (5, 5, 5))
    c = M.cluster_counts(pred, ref)
    assert (c.n_ref, c.fp) == (0, 1) and math.isnan(c.tpr)
    v = M.valdo_subject(pred, ref, np.eye(4))
    assert math.isnan(v.f1) and v.count_difference == 1
    both_empty = M.valdo_subject(ref, ref, np.eye(4))
    assert math.isnan(both_empty.f1) and both_empty.count_difference == 0


def test_empty_prediction_gives_zero_f1():
    ref = blob(SHAPE, (5, 5, 5))
    v = M.valdo_subject(np.zeros(SHAPE), ref, np.eye(4))
    assert v.f1 == 0.0 and v.fn == 1 and v.count_difference == 1
    c = M.cluster_counts(np.zeros(SHAPE), ref)
    assert (c.tp, c.fn, c.fp) == (0, 1, 0) and math.isnan(c.precision)


def test_anisotropic_spacing_uses_mm_not_voxels():
    # 3 voxels apart along k: 3 mm at 1 mm spacing (match), 6 mm at 2 mm spacing (no match)
    ref = blob(SHAPE, (5, 5, 5), r=0)
    pred = blob(SHAPE, (8, 5, 5), r=0)
    iso = Volume.from_arrays(ref, spacing=(1, 1, 1))
    aniso = Volume.from_arrays(ref, spacing=(0.5, 0.5, 2.0))
    assert M.valdo_subject(pred, ref, iso.ijk_to_ras).tp == 1
    assert M.valdo_subject(pred, ref, aniso.ijk_to_ras).tp == 0
    # oblique grid: rotation keeps distances; 2 mm along k at 45 degrees is still 6 mm
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    obl = Volume.from_arrays(ref, spacing=(0.5, 0.5, 2.0), direction=rot, origin=(10, -3, 7))
    v = M.valdo_subject(pred, ref, obl.ijk_to_ras)
    assert v.tp == 0
    cen = M.centroids_ras(*M.label_components(ref), obl.ijk_to_ras)
    assert np.allclose(cen[0], obl.ijk_to_ras_points([[5, 5, 5]])[0])


def test_five_mm_boundary_is_strict():
    ref = np.array([[0.0, 0.0, 0.0]])
    assert M.match_points([[4.99, 0, 0]], ref).tp == 1
    assert M.match_points([[5.0, 0, 0]], ref).tp == 0
    assert M.match_points([[5.0, 0, 0]], ref, max_distance_mm=5.01).tp == 1
    # the same boundary through label maps: 5 voxels apart at 1 mm
    a = blob(SHAPE, (5, 5, 5), r=0)
    assert M.valdo_subject(blob(SHAPE, (5, 5, 10), r=0), a, np.eye(4)).tp == 0
    assert M.valdo_subject(blob(SHAPE, (5, 5, 9), r=0), a, np.eye(4)).tp == 1


def test_point_rules_differ_on_duplicates():
    ref = [[0, 0, 0], [20, 0, 0]]
    pred = [[1, 0, 0], [0, 2, 0], [50, 0, 0]]
    v = M.match_points(pred, ref, 5, "valdo")
    assert (v.tp, v.fn, v.fp) == (1, 1, 2) and v.pred_ref == [0, -1, -1]
    a = M.match_points(pred, ref, 5, "any")
    assert (a.tp, a.fn, a.fp) == (1, 1, 1)
    h = M.match_points(pred, ref, 5, "hungarian")
    assert (h.tp, h.fn, h.fp) == (1, 1, 2)
    # nearest-claim: a prediction between two references claims the nearer one only
    v2 = M.match_points([[9, 0, 0], [11.5, 0, 0]], [[6, 0, 0], [14, 0, 0]], 5, "valdo")
    assert v2.pred_ref == [0, 1] and v2.tp == 2
    # hungarian resolves what greedy nearest-claim cannot
    v3 = M.match_points([[2, 0, 0], [-2, 0, 0]], [[0, 0, 0], [4, 0, 0]], 5, "valdo")
    h3 = M.match_points([[2, 0, 0], [-2, 0, 0]], [[0, 0, 0], [4, 0, 0]], 5, "hungarian")
    assert v3.tp == 1 and h3.tp == 2


def test_ref_as_labels_keeps_touching_cmbs_apart():
    ref = np.zeros(SHAPE, np.uint16)
    ref[5, 5, 5:7] = 1
    ref[5, 5, 7:9] = 2  # touching, different labels
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 5, 5] = 1
    assert M.cluster_counts(pred, ref).n_ref == 1
    c = M.cluster_counts(pred, ref, ref_as_labels=True)
    assert c.n_ref == 2 and c.ref_detected == [True, False] and c.ref_values == [1, 2]


def test_pool_and_summarise():
    a = M.ClusterCounts(2, 3, 2, 0, 2, 1)
    b = M.ClusterCounts(0, 1, 0, 0, 0, 1)
    p = M.pool_cluster([a, b])
    assert p["tpr"] == 1.0 and p["precision"] == 0.5 and p["fp_per_subject"] == 1.0
    ms = [M.match_points([[0, 0, 0]], [[0, 0, 0]]),               # F1 1
          M.match_points([], [[0, 0, 0]]),                        # F1 0
          M.match_points([[0, 0, 0], [9, 9, 9]], [[0, 0, 0]]),    # F1 2/3
          M.match_points([[0, 0, 0]], [])]                        # NaN, excluded
    s = M.summarise_valdo(ms)
    assert s["cmb_positive_subjects"] == 3
    assert s["f1_median"] == pytest.approx(2 / 3)
    assert s["count_difference_mean"] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert s["fp"] == 2


def test_stage_selection():
    conf = [0.9, 0.2, 0.7]
    kept = [True, True, False]
    assert M.stage_selection(conf, kept, 0.5, "candidates").tolist() == [True] * 3
    assert M.stage_selection(conf, kept, 0.5, "student").tolist() == [True, False, True]
    assert M.stage_selection(conf, kept, 0.5, "cleanup").tolist() == [True, False, False]


def test_froc_monotone_and_known_points(tmp_path):
    subj = [{"pred_ras": [[0, 0, 0], [30, 0, 0], [60, 0, 0]], "confidence": [0.9, 0.8, 0.3],
             "kept": [True, True, True], "ref_ras": [[0, 0, 0], [60, 0, 0]]},
            {"pred_ras": [[10, 10, 10]], "confidence": [0.6], "kept": [False],
             "ref_ras": np.zeros((0, 3))}]
    f = M.froc(subj, require_kept=False)
    t = np.array(f["threshold"])
    fp = np.array(f["fp_per_subject"])
    tpr = np.array(f["tpr"])
    assert np.all(np.diff(fp) <= 0) and np.all(np.diff(tpr) <= 0)
    at = lambda x: (tpr[t == x][0], fp[t == x][0])  # noqa: E731
    assert at(0.0) == (1.0, 1.0)     # 2/2 found, FP: 30 mm point + the other subject's one
    assert at(0.9) == (0.5, 0.0)
    assert tpr[-1] == 0.0 and fp[-1] == 0.0
    assert f["tpr_at_fp"]["0.5"] == 0.5
    kept_only = M.froc(subj, require_kept=True)
    assert kept_only["fp_per_subject"][0] == 0.5  # the unkept FP is gone
    png = M.plot_froc({"student": f, "cleanup": kept_only}, tmp_path / "f.png",
                      operating_points={"cleanup": (0.5, 1.0)})
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_size_bins():
    assert M.size_bin(2.0) == "<3 mm"
    assert M.size_bin(3.0) == "3-5 mm"
    assert M.size_bin(4.99) == "3-5 mm"
    assert M.size_bin(5.0) == ">=5 mm"
    assert M.size_bin_labels((2, 4, 6)) == ["<2 mm", "2-4 mm", "4-6 mm", ">=6 mm"]


def _counts(tp, n_ref, fp):
    return M.ClusterCounts(n_ref, tp + fp, tp, n_ref - tp, tp, fp)


def test_bootstrap_resamples_whole_subjects():
    # Every subject has one detected CMB in one scan and one missed CMB in the other: resampling
    # subjects always gives TPR 0.5; treating each scan as its own subject does not.
    counts = [_counts(1, 1, 0), _counts(0, 1, 2)] * 20
    subjects = [n // 2 for n in range(40)]
    by_subject = M.bootstrap_cluster_ci(counts, subjects)
    by_scan = M.bootstrap_cluster_ci(counts, list(range(40)))
    assert by_subject["tpr_ci"] == [0.5, 0.5] and by_subject["ci_resampled_subjects"] == 20
    assert by_subject["fp_per_subject_ci"] == [1.0, 1.0]
    assert by_scan["tpr_ci"][0] < 0.4 and by_scan["tpr_ci"][1] > 0.6


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_subjects():
    rng = np.random.default_rng(0)

    def make(n):
        return [_counts(int(t), 4, int(f)) for t, f in
                zip(rng.binomial(4, 0.8, n), rng.poisson(1.0, n))]
    small, large = make(15), make(240)
    ci_s = M.bootstrap_cluster_ci(small, list(range(15)))
    ci_l = M.bootstrap_cluster_ci(large, list(range(240)))
    pooled = M.pool_cluster(small)
    assert ci_s["tpr_ci"][0] <= pooled["tpr"] <= ci_s["tpr_ci"][1]
    assert ci_s["fp_per_subject_ci"][0] <= pooled["fp_per_subject"] <= ci_s["fp_per_subject_ci"][1]
    width = lambda c: c["tpr_ci"][1] - c["tpr_ci"][0]  # noqa: E731
    assert width(ci_l) < 0.5 * width(ci_s)


def _random_subjects(rng, n, shift=0.0):
    subs = []
    for _ in range(n):
        ref = rng.uniform(0, 100, (rng.integers(0, 4), 3))
        near = ref + rng.normal(0, 1.0, ref.shape)
        far = rng.uniform(0, 100, (rng.integers(0, 6), 3)) + 300.0
        conf = np.concatenate([np.clip(rng.uniform(0.3, 1.0, len(near)) - shift, 0, 1),
                               rng.uniform(0, 0.9, len(far))])
        subs.append({"pred_ras": np.vstack([near, far]), "confidence": np.round(conf, 3),
                     "kept": np.ones(len(conf), bool), "ref_ras": ref})
    return subs


def test_exact_froc_average_equals_the_swept_froc():
    subs = _random_subjects(np.random.default_rng(5), 25)
    swept = M.froc(subs, require_kept=False, max_points=10**6)["mean_tpr_at_fp"]
    ops = [M.froc_operands(s) for s in subs]
    exact = M.mean_tpr_at_fp(np.concatenate([o[0] for o in ops]),
                             np.concatenate([o[1] for o in ops]), len(subs))
    assert exact == pytest.approx(swept, abs=1e-9)


def test_paired_bootstrap_sees_a_real_difference_and_none_between_twins():
    rng = np.random.default_rng(6)
    a = _random_subjects(rng, 40)
    b = [dict(s, confidence=np.where(np.arange(len(s["confidence"])) < len(s["ref_ras"]),
                                     s["confidence"] - 0.3, s["confidence"])) for s in a]
    groups = [n // 2 for n in range(40)]
    same = M.paired_froc_bootstrap(a, a, groups, n_boot=200)
    assert same["difference"] == 0 and same["difference_ci"] == [0.0, 0.0]
    worse = M.paired_froc_bootstrap(a, b, groups, n_boot=200)
    assert worse["difference"] > 0 and worse["difference_ci"][0] > 0
    assert worse["resampled_subjects"] == 20
