"""Detection metrics for microbleeds: cluster-wise overlap, VALDO centroid matching, FROC.

Pure numpy/scipy functions (no I/O). Two metric families are reported because they disagree in
instructive ways (see ``simulation_and_metrics.md`` section 3):

* **Cluster-wise overlap** (Sundaresan et al. 2023, the paper we re-implement): connected
  components (26-connectivity by default) of prediction and reference; a reference cluster is
  *detected* if any predicted voxel overlaps it; a predicted cluster is a *false positive* if it
  overlaps no reference voxel. No one-to-one constraint: one large predicted blob covering two
  references detects both, and counts as one true-positive *prediction*. A one-to-one variant
  (Hungarian assignment maximising voxel overlap, pairs with overlap > 0 are TP) is also given.
* **VALDO centroid matching** (VALDO 2021 task 2): components' centres of mass in RAS mm; each
  predicted component claims its nearest reference whose centre is strictly closer than
  ``max_distance_mm`` (default 5 mm); if several claim one reference the closest is TP and the
  others FP; unclaimed references are FN. F1 = 2TP / (2TP + FN + FP) per subject; NaN when the
  reference is empty (excluded from the median), 0 when the prediction is empty and the reference
  is not. ``|#ref - #pred|`` is defined for every subject.

Centres of mass are mapped to RAS through the grid's full ``ijk_to_ras`` matrix, never header
zooms, so oblique and anisotropic grids give physical distances.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

#: default VALDO matching distance (mm)
DEFAULT_DISTANCE_MM = 5.0
#: default lesion-size bins on the *true diameter* (mm): [0, 3), [3, 5), [5, inf)
DEFAULT_SIZE_BINS_MM = (3.0, 5.0)
#: bins on the *visible* diameter (equivalent sphere of the labelled footprint on the image);
#: the 4 mm edge gives the ">= 4 mm found" target its exact figure
VISIBLE_SIZE_BINS_MM = (1.5, 2.0, 3.0, 4.0, 5.0)
#: rating criterion: raters mark dark foci of roughly 2-10 mm on the image (Greenberg et al.,
#: Lancet Neurol 2009). Simulated CMBs whose visible footprint is smaller are scored apart.
DEFAULT_RATED_DIAMETER_MM = 2.0


# --------------------------------------------------------------------------------------------
# connected components and centroids
# --------------------------------------------------------------------------------------------
def _structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    rank = {6: 1, 18: 2, 26: 3}.get(int(connectivity))
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, rank)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of ``mask != 0`` (3D, 6/18/26-connectivity).

    Returns ``(labels int32 [k, j, i], n)``; component ``c`` has label ``c`` (1..n).
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D array, got {mask.ndim}D")
    labels, n = ndimage.label(mask != 0, structure=_structure(connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def _elements(arr: np.ndarray, connectivity: int, as_labels: bool) -> tuple[np.ndarray, int,
                                                                              np.ndarray]:
    """Elements of a map: connected components, or (``as_labels``) each distinct label value.

    Returns ``(element map with values 1..n, n, original label value of each element)``.
    """
    arr = np.asarray(arr)
    if as_labels:
        values = np.unique(arr[arr != 0]).astype(np.int64)
        lut_keys = np.searchsorted(values, arr[arr != 0])
        out = np.zeros(arr.shape, np.int32)
        out[arr != 0] = lut_keys + 1
        return out, int(values.size), values
    labels, n = label_components(arr, connectivity)
    return labels, n, np.arange(1, n + 1)


def _label_pair(pred, ref, connectivity: int, ref_as_labels: bool):
    """Reference elements and prediction components of two label maps on one grid."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    rl, nr, rvals = _elements(ref, connectivity, ref_as_labels)
    pl, npred = label_components(pred, connectivity)
    return rl, nr, rvals, pl, npred


def centroids_ras(labels: np.ndarray, n: int, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Unweighted centres of mass of elements 1..n, in RAS mm, shape ``(n, 3)``.

    The voxel centroid ``(k, j, i)`` is reversed to ``(i, j, k)`` and mapped with the full
    4x4 matrix, so spacing, direction and origin are all honoured.
    """
    if n == 0:
        return np.zeros((0, 3))
    idx = np.nonzero(labels)
    lab = labels[idx]
    counts = np.bincount(lab, minlength=n + 1)[1:].astype(float)
    kji = np.stack([np.bincount(lab, weights=c.astype(float), minlength=n + 1)[1:] for c in idx],
                   axis=1) / counts[:, None]
    ijk = kji[:, ::-1]
    m = np.asarray(ijk_to_ras, float)
    return ijk @ m[:3, :3].T + m[:3, 3]


def equivalent_diameters(labels: np.ndarray, values, voxel_mm3: float) -> np.ndarray:
    """Diameter (mm) of the sphere with the volume of each label value's voxels (0 if absent).

    Applied to a truth label map, this is the lesion's *visible* size: the footprint a rater
    sees, blooming included, as opposed to the true source diameter of a simulation.
    """
    arr = np.asarray(labels)
    vals = np.asarray(list(values), np.int64)
    if vals.size == 0:
        return np.zeros(0)
    present, counts = np.unique(arr[arr != 0], return_counts=True)
    lut = dict(zip(present.tolist(), counts.tolist()))
    vol = np.array([lut.get(int(v), 0) for v in vals], float) * float(voxel_mm3)
    return (6.0 * vol / math.pi) ** (1.0 / 3.0)


def overlap_matrix(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray,
                   n_pred: int) -> np.ndarray:
    """Voxel counts shared by reference element r (row r-1) and predicted element p (col p-1)."""
    both = (ref_labels > 0) & (pred_labels > 0)
    pair = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    flat = np.bincount(pair, minlength=(n_ref + 1) * (n_pred + 1))
    return flat.reshape(n_ref + 1, n_pred + 1)[1:, 1:]


# --------------------------------------------------------------------------------------------
# cluster-wise (overlap) matching
# --------------------------------------------------------------------------------------------
@dataclass
class ClusterCounts:
    """Per-subject cluster-wise result.

    ``tp`` counts detected *reference* clusters (numerator of TPR); ``tp_pred`` counts predicted
    clusters touching any reference (numerator of precision). They differ when blobs merge or
    split; in the one-to-one variant they are equal.
    """

    n_ref: int
    n_pred: int
    tp: int
    fn: int
    tp_pred: int
    fp: int
    ref_detected: list = field(default_factory=list)  # bool per reference element
    ref_values: list = field(default_factory=list)    # label value of each reference element

    @property
    def tpr(self) -> float:
        return self.tp / self.n_ref if self.n_ref else math.nan

    @property
    def precision(self) -> float:
        return self.tp_pred / self.n_pred if self.n_pred else math.nan

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tpr"] = _clean(self.tpr)
        d["precision"] = _clean(self.precision)
        return d


def cluster_counts_from_overlap(ov: np.ndarray, one_to_one: bool = False) -> ClusterCounts:
    """Cluster-wise counts from an overlap matrix (rows: references, columns: predictions)."""
    n_ref, n_pred = ov.shape
    if one_to_one:
        from scipy.optimize import linear_sum_assignment

        detected = np.zeros(n_ref, bool)
        tp = 0
        if n_ref and n_pred:
            rows, cols = linear_sum_assignment(ov, maximize=True)
            good = ov[rows, cols] > 0
            detected[rows[good]] = True
            tp = int(good.sum())
        return ClusterCounts(n_ref, n_pred, tp, n_ref - tp, tp, n_pred - tp,
                             detected.tolist())
    detected = (ov > 0).any(axis=1) if n_pred else np.zeros(n_ref, bool)
    pred_hit = (ov > 0).any(axis=0) if n_ref else np.zeros(n_pred, bool)
    tp = int(detected.sum())
    tp_pred = int(pred_hit.sum())
    return ClusterCounts(n_ref, n_pred, tp, n_ref - tp, tp_pred, n_pred - tp_pred,
                         detected.tolist())


def cluster_counts(pred: np.ndarray, ref: np.ndarray, connectivity: int = 26,
                   one_to_one: bool = False, ref_as_labels: bool = False) -> ClusterCounts:
    """Cluster-wise TP/FN/FP of one subject (prediction and reference on the same grid).

    Parameters
    ----------
    pred, ref : arrays [k, j, i]
        Nonzero = lesion. Both are split into connected components (``connectivity`` 6/18/26).
    one_to_one : bool
        False (default, the paper's rule): a reference is detected if any predicted voxel
        overlaps it; a prediction is FP if it overlaps no reference voxel. True: Hungarian
        assignment maximising overlap; matched pairs with overlap > 0 are TP,
        FP = #pred - TP, FN = #ref - TP.
    ref_as_labels : bool
        Treat each distinct nonzero value of ``ref`` as one lesion instead of its connected
        components (so two touching simulated CMBs stay two lesions).
    """
    rl, nr, rvals, pl, npred = _label_pair(pred, ref, connectivity, ref_as_labels)
    res = cluster_counts_from_overlap(overlap_matrix(rl, nr, pl, npred), one_to_one)
    res.ref_values = [int(v) for v in rvals]
    return res


def pool_cluster(counts: list) -> dict:
    """Pool per-subject :class:`ClusterCounts` (micro-average) plus macro-averages.

    ``tpr`` = ΣTP / Σ#ref, ``precision`` = ΣTP_pred / Σ#pred, ``fp_per_subject`` = ΣFP / N.
    Macro TPR averages per-subject TPR over subjects with at least one reference lesion.
    """
    n = len(counts)
    s = {k: int(sum(getattr(c, k) for c in counts))
         for k in ("n_ref", "n_pred", "tp", "fn", "tp_pred", "fp")}
    per_tpr = [c.tpr for c in counts if c.n_ref]
    per_prec = [c.precision for c in counts if c.n_pred]
    tpr = s["tp"] / s["n_ref"] if s["n_ref"] else math.nan
    prec = s["tp_pred"] / s["n_pred"] if s["n_pred"] else math.nan
    f1 = 2 * prec * tpr / (prec + tpr) if (prec + tpr) > 0 else (0.0 if s["n_ref"] else math.nan)
    return {"subjects": n, **s, "tpr": _clean(tpr), "precision": _clean(prec),
            "f1": _clean(f1),
            "fp_per_subject": _clean(s["fp"] / n if n else math.nan),
            "macro_tpr": _clean(float(np.mean(per_tpr)) if per_tpr else math.nan),
            "macro_precision": _clean(float(np.mean(per_prec)) if per_prec else math.nan)}


def subject_members(groups: list) -> list:
    """Scan indices of each subject, subjects in order of first appearance (the unit a
    bootstrap resamples)."""
    members: dict = {}
    for n, g in enumerate(groups):
        members.setdefault(g, []).append(n)
    return list(members.values())


def percentile_ci(draws, level: float) -> list:
    """Central ``level`` percentile interval of bootstrap draws (NaN draws ignored)."""
    v = np.asarray(draws, float)
    if not np.isfinite(v).any():  # e.g. no reference lesion at all: TPR is undefined
        return [None, None]
    q = [50 * (1 - level), 50 * (1 + level)]
    return [_clean(float(x)) for x in np.nanpercentile(v, q)]


def bootstrap_cluster_ci(counts: list, groups: list, n_boot: int = 2000, level: float = 0.95,
                         seed: int = 0) -> dict:
    """Percentile bootstrap intervals of pooled TPR and FP per scan.

    Whole *subjects* are resampled (``groups[n]`` names the subject of ``counts[n]``): the
    scans of one subject share its lesions and anatomy, so resampling scans would understate
    the spread. With a few dozen subjects the intervals are wide — that is the point.
    """
    if not counts:
        return {}
    per = np.array([[sum(getattr(counts[n], k) for n in m) for k in ("tp", "n_ref", "fp")]
                    + [len(m)] for m in subject_members(groups)], float)  # tp, n_ref, fp, scans
    draw = np.random.default_rng(seed).integers(0, len(per), (n_boot, len(per)))
    tot = per[draw].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tot[:, 0] / tot[:, 1]
    fp = tot[:, 2] / tot[:, 3]
    return {"tpr_ci": percentile_ci(tpr, level), "fp_per_subject_ci": percentile_ci(fp, level),
            "ci_level": level,
            "ci_resampled_subjects": len(per), "ci_bootstrap": n_boot}


# --------------------------------------------------------------------------------------------
# point matching (VALDO, any-within-distance, one-to-one)
# --------------------------------------------------------------------------------------------
POINT_RULES = ("valdo", "any", "hungarian")


@dataclass
class PointMatch:
    """Result of matching predicted points to reference points in one subject.

    ``pred_ref[p]`` is the reference index prediction p is a TP for, or -1 (FP). ``ref_hit[r]``
    tells whether reference r is detected. ``pred_near[p]`` is True when some reference lies
    within the distance (whether or not p was the TP for it), which separates duplicate hits
    from stray false positives.
    """

    n_ref: int
    n_pred: int
    tp: int
    fn: int
    fp: int
    pred_ref: list
    ref_hit: list
    pred_near: list
    distances_mm: list  # distance of each TP prediction to its reference

    @property
    def f1(self) -> float:
        return f1_score(self.tp, self.fn, self.fp)

    @property
    def count_difference(self) -> int:
        return abs(self.n_ref - self.n_pred)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["f1"] = _clean(self.f1)
        d["count_difference"] = self.count_difference
        return d


def f1_score(tp: int, fn: int, fp: int) -> float:
    """F1 = 2TP / (2TP + FN + FP); NaN when the reference is empty (TP + FN == 0).

    An empty prediction with a non-empty reference gives 0 (VALDO ``f1_count_element``).
    """
    if tp + fn == 0:
        return math.nan
    return 2.0 * tp / (2.0 * tp + fn + fp)


def _as_points(p) -> np.ndarray:
    p = np.asarray(p, float)
    if p.size == 0:
        return np.zeros((0, 3))
    p = np.atleast_2d(p)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"expected (N, 3) points in RAS mm, got shape {p.shape}")
    return p


def match_points(pred_ras, ref_ras, max_distance_mm: float = DEFAULT_DISTANCE_MM,
                 rule: str = "valdo") -> PointMatch:
    """Match predicted lesion centres to reference centres (both RAS mm).

    Parameters
    ----------
    max_distance_mm : float
        A pair can match only when its distance is **strictly below** this (VALDO's ``<``).
    rule : {"valdo", "any", "hungarian"}
        ``valdo``: each prediction claims its nearest reference within the distance; if several
        claim one reference the closest is TP and the rest FP. ``any`` (point analogue of the
        cluster-wise rule): a reference is detected if any prediction lies within the distance;
        a prediction is FP only if no reference does (duplicates are not penalised; ``tp`` then
        counts detected references). ``hungarian``: one-to-one assignment minimising the total
        distance over pairs within the distance.
    """
    if rule not in POINT_RULES:
        raise ValueError(f"rule must be one of {POINT_RULES}, got {rule!r}")
    pred = _as_points(pred_ras)
    ref = _as_points(ref_ras)
    npred, nref = len(pred), len(ref)
    pred_ref = np.full(npred, -1, int)
    ref_hit = np.zeros(nref, bool)
    if npred and nref:
        d = np.linalg.norm(pred[:, None, :] - ref[None, :, :], axis=2)
        ok = d < float(max_distance_mm)
    else:
        d = np.zeros((npred, nref))
        ok = np.zeros((npred, nref), bool)
    near = ok.any(axis=1) if nref else np.zeros(npred, bool)
    if npred and nref:
        if rule == "valdo":
            nearest = np.argmin(np.where(ok, d, np.inf), axis=1)
            for r in range(nref):
                claim = np.nonzero(near & (nearest == r))[0]
                if claim.size:
                    best = claim[np.argmin(d[claim, r])]
                    pred_ref[best] = r
                    ref_hit[r] = True
        elif rule == "any":
            ref_hit = ok.any(axis=0)
            nearest = np.argmin(np.where(ok, d, np.inf), axis=1)
            pred_ref = np.where(near, nearest, -1)
        else:
            from scipy.optimize import linear_sum_assignment

            big = 1e6
            rows, cols = linear_sum_assignment(np.where(ok, d, big))
            good = ok[rows, cols]
            pred_ref[rows[good]] = cols[good]
            ref_hit[cols[good]] = True
    tp = int(ref_hit.sum())
    fp = int((~near).sum()) if rule == "any" else int((pred_ref < 0).sum())
    dist = [float(d[p, r]) for p, r in enumerate(pred_ref) if r >= 0]
    return PointMatch(nref, npred, tp, nref - tp, fp, pred_ref.tolist(), ref_hit.tolist(),
                      near.tolist(), dist)


def valdo_subject(pred: np.ndarray, ref: np.ndarray, ijk_to_ras: np.ndarray,
                  max_distance_mm: float = DEFAULT_DISTANCE_MM, connectivity: int = 26,
                  ref_as_labels: bool = False) -> PointMatch:
    """VALDO centroid matching of one subject from label maps on the same grid.

    VALDO's challenge used 6-connectivity; 26 is the default here for consistency with the
    cluster-wise family. Set ``connectivity=6`` to reproduce the challenge.
    """
    rl, nr, _, pl, npred = _label_pair(pred, ref, connectivity, ref_as_labels)
    return match_points(centroids_ras(pl, npred, ijk_to_ras), centroids_ras(rl, nr, ijk_to_ras),
                        max_distance_mm, "valdo")


def summarise_valdo(matches: list) -> dict:
    """Median and IQR of per-subject F1 over CMB-positive subjects; |Δcount| over all subjects."""
    f1 = np.array([m.f1 for m in matches], float)
    pos = f1[~np.isnan(f1)]
    cd = np.array([m.count_difference for m in matches], float)
    tp = sum(m.tp for m in matches)
    fn = sum(m.fn for m in matches)
    fp = sum(m.fp for m in matches)
    q = np.percentile(pos, [25, 50, 75]) if pos.size else [math.nan] * 3
    return {"subjects": len(matches), "cmb_positive_subjects": int(pos.size),
            "f1_median": _clean(q[1]), "f1_q1": _clean(q[0]), "f1_q3": _clean(q[2]),
            "f1_iqr": _clean(q[2] - q[0]),
            "f1_mean": _clean(float(pos.mean()) if pos.size else math.nan),
            "count_difference_mean": _clean(float(cd.mean()) if cd.size else math.nan),
            "count_difference_median": _clean(float(np.median(cd)) if cd.size else math.nan),
            "tp": tp, "fn": fn, "fp": fp, "pooled_f1": _clean(f1_score(tp, fn, fp)),
            "tpr": _clean(tp / (tp + fn) if tp + fn else math.nan),
            "fp_per_subject": _clean(fp / len(matches) if matches else math.nan)}


# --------------------------------------------------------------------------------------------
# candidate sets: stages, FROC
# --------------------------------------------------------------------------------------------
STAGES = ("candidates", "student", "cleanup")


def stage_selection(confidence, kept, threshold: float, stage: str) -> np.ndarray:
    """Boolean mask of candidates surviving ``stage``.

    ``candidates``: all; ``student``: ``confidence >= threshold``; ``cleanup``: kept by the
    morphological clean-up *and* ``confidence >= threshold`` (what the engine reports).
    """
    conf = np.asarray(confidence, float)
    if stage == "candidates":
        return np.ones(conf.shape, bool)
    sel = conf >= float(threshold)
    if stage == "student":
        return sel
    if stage == "cleanup":
        return sel & np.asarray(kept, bool)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def pool_points(matches: list, rule: str = "any") -> dict:
    """Pooled TPR, precision and FP per subject of point matches (one per subject).

    Precision counts predictions near a reference (``any``) or TP predictions (other rules).
    """
    n = len(matches)
    nref = sum(m.n_ref for m in matches)
    npred = sum(m.n_pred for m in matches)
    tp = sum(m.tp for m in matches)
    fp = sum(m.fp for m in matches)
    good_pred = npred - fp
    tpr = tp / nref if nref else math.nan
    prec = good_pred / npred if npred else math.nan
    return {"subjects": n, "n_ref": nref, "n_pred": npred, "tp": tp, "fn": nref - tp, "fp": fp,
            "tpr": _clean(tpr), "precision": _clean(prec),
            "fp_per_subject": _clean(fp / n if n else math.nan)}


def froc(subjects: list, max_distance_mm: float = DEFAULT_DISTANCE_MM, rule: str = "any",
         require_kept: bool = True, thresholds=None, max_points: int = 400) -> dict:
    """FROC: pooled TPR against mean FP per subject while sweeping the confidence threshold.

    Parameters
    ----------
    subjects : list of dict
        Each with ``pred_ras`` (N, 3), ``confidence`` (N,), ``kept`` (N,) and ``ref_ras`` (M, 3).
    require_kept : bool
        True sweeps the final output (clean-up verdict applied); False sweeps the student alone.
    thresholds : sequence, optional
        Default: every distinct confidence (subsampled to ``max_points`` quantiles when there are
        more), plus 0 and just above the maximum so the curve reaches both ends.

    Returns
    -------
    dict with ``threshold``, ``tpr``, ``fp_per_subject``, ``precision`` lists (threshold
    ascending, so FP decreasing) and ``tpr_at_fp`` (best TPR with FP/subject <= 0.125 ... 8).
    """
    prepared = []
    allconf = []
    for s in subjects:
        pred = _as_points(s.get("pred_ras", []))
        conf = np.asarray(s.get("confidence", np.ones(len(pred))), float).reshape(-1)
        kept = np.asarray(s.get("kept", np.ones(len(pred), bool)), bool).reshape(-1)
        if require_kept:
            pred, conf = pred[kept], conf[kept]
        prepared.append((pred, conf, _as_points(s.get("ref_ras", []))))
        allconf.append(conf)
    allconf = np.concatenate(allconf) if allconf else np.zeros(0)
    if thresholds is None:
        u = np.unique(allconf)
        if u.size > max_points:
            u = np.unique(np.quantile(u, np.linspace(0, 1, max_points)))
        top = float(u.max()) + 1e-6 if u.size else 1.0
        thresholds = np.unique(np.concatenate([[0.0], u, [top]]))
    thresholds = np.sort(np.asarray(thresholds, float))
    tpr, fps, prec = [], [], []
    for t in thresholds:
        ms = [match_points(p[c >= t], r, max_distance_mm, rule) for p, c, r in prepared]
        pooled = pool_points(ms, rule)
        tpr.append(pooled["tpr"])
        fps.append(pooled["fp_per_subject"])
        prec.append(pooled["precision"])
    tpr_at = {}
    for limit in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        ok = [t for t, f in zip(tpr, fps) if f is not None and t is not None and f <= limit]
        tpr_at[str(limit)] = max(ok) if ok else 0.0
    return {"rule": rule, "max_distance_mm": float(max_distance_mm),
            "require_kept": bool(require_kept), "threshold": [float(t) for t in thresholds],
            "tpr": tpr, "fp_per_subject": fps, "precision": prec, "tpr_at_fp": tpr_at,
            "mean_tpr_at_fp": _clean(float(np.mean(list(tpr_at.values()))))}


FROC_LIMITS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def froc_operands(subject: dict, max_distance_mm: float = DEFAULT_DISTANCE_MM,
                  require_kept: bool = False):
    """What the ``any``-rule FROC of one subject depends on, whatever the threshold: per true
    CMB the highest confidence among candidates closer than the distance (``-inf`` if none),
    and the confidences of candidates near no CMB (the false positives)."""
    pred = _as_points(subject.get("pred_ras", []))
    conf = np.asarray(subject.get("confidence", np.ones(len(pred))), float).reshape(-1)
    if require_kept:
        kept = np.asarray(subject.get("kept", np.ones(len(pred), bool)), bool).reshape(-1)
        pred, conf = pred[kept], conf[kept]
    ref = _as_points(subject.get("ref_ras", []))
    if len(pred) and len(ref):
        ok = np.linalg.norm(pred[:, None] - ref[None], axis=2) < float(max_distance_mm)
    else:
        ok = np.zeros((len(pred), len(ref)), bool)
    best = np.where(ok, conf[:, None], -np.inf).max(0) if len(pred) else np.full(len(ref),
                                                                                -np.inf)
    return best, conf[~ok.any(1)] if len(ref) else conf


def mean_tpr_at_fp(best: np.ndarray, fp_conf: np.ndarray, n_subjects: int,
                   limits=FROC_LIMITS) -> float:
    """Mean over ``limits`` of the best pooled TPR with at most ``limit`` FP per subject, exact
    over every threshold (the FROC of :func:`froc` with the ``any`` rule, not subsampled)."""
    if not len(best):
        return math.nan
    fp_desc = np.sort(fp_conf)[::-1]
    out = []
    for limit in limits:
        allowed = int(math.floor(limit * n_subjects + 1e-9))
        if len(fp_desc) <= allowed:
            out.append(np.mean(best >= 0.0) if np.isfinite(best).any() else 0.0)
        else:
            out.append(np.mean(best > fp_desc[allowed]))
    return float(np.mean(out))


def paired_froc_bootstrap(subjects_a: list, subjects_b: list, groups: list,
                          max_distance_mm: float = DEFAULT_DISTANCE_MM,
                          require_kept: bool = False, n_boot: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict:
    """FROC-averaged TPR of two classifiers scored on the *same* scans (same order), and a
    paired bootstrap interval of their difference (a − b), resampling whole subjects: far
    tighter than comparing two unpaired intervals, because both see the same lesions."""
    if len(subjects_a) != len(subjects_b) or len(subjects_a) != len(groups):
        raise ValueError("paired comparison needs the same scans for both classifiers")
    ops = [[froc_operands(s, max_distance_mm, require_kept) for s in subs]
           for subs in (subjects_a, subjects_b)]
    members = subject_members(groups)

    def stat(scans):
        vals = []
        for op in ops:
            best = np.concatenate([op[n][0] for n in scans]) if scans else np.zeros(0)
            fp = np.concatenate([op[n][1] for n in scans]) if scans else np.zeros(0)
            vals.append(mean_tpr_at_fp(best, fp, len(scans)))
        return vals

    a, b = stat(list(range(len(groups))))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        scans = [n for g in rng.integers(0, len(members), len(members)) for n in members[g]]
        va, vb = stat(scans)
        diffs.append(va - vb)
    return {"a": _clean(a), "b": _clean(b), "difference": _clean(a - b),
            "difference_ci": percentile_ci(diffs, level), "ci_level": level,
            "resampled_subjects": len(members), "bootstrap": n_boot,
            "limits": list(FROC_LIMITS), "require_kept": require_kept}


def plot_froc(curves: dict, path, title: str = "FROC", operating_points: dict | None = None):
    """Write a FROC plot (PNG) of ``{name: froc(...) result}``; matplotlib Agg, no display.

    ``operating_points`` maps curve name -> (fp_per_subject, tpr) to mark the written threshold.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for name, c in curves.items():
        pts = sorted((f, t) for f, t in zip(c["fp_per_subject"], c["tpr"])
                     if f is not None and t is not None)
        if not pts:
            continue
        x, y = zip(*pts)  # FP ascending; steps-post draws the best TPR reached at each FP
        ax.plot(x, y, drawstyle="steps-post", label=name)
        if operating_points and name in operating_points:
            ox, oy = operating_points[name]
            ax.plot([ox], [oy], "o", color=ax.lines[-1].get_color())
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean false positives per scan")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    return path


def size_bin_labels(edges_mm=DEFAULT_SIZE_BINS_MM) -> list:
    """Names of the diameter bins: ``<3 mm``, ``3-5 mm``, ``>=5 mm`` for edges (3, 5)."""
    e = [float(x) for x in edges_mm]
    fmt = lambda v: f"{v:g}"  # noqa: E731
    names = [f"<{fmt(e[0])} mm"]
    names += [f"{fmt(a)}-{fmt(b)} mm" for a, b in zip(e[:-1], e[1:])]
    names.append(f">={fmt(e[-1])} mm")
    return names


def size_bin(diameter_mm: float, edges_mm=DEFAULT_SIZE_BINS_MM) -> str:
    """Bin name of a true diameter (mm)."""
    return size_bin_labels(edges_mm)[int(np.searchsorted(np.asarray(edges_mm, float),
                                                         float(diameter_mm), side="right"))]


def _clean(v):
    """JSON-safe float: NaN/inf -> None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
