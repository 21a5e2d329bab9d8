"""``cmbdetector evaluate``: score detection outputs against ground truth, both metric families.

Reads per-subject engine outputs (``<stem>_cmb.nii.gz`` lesion label map at the written threshold,
``<stem>_detection.json`` with every candidate's ``confidence``, ``kept``, ``centroid_ras``,
``volume_mm3``) and simulator truth (``<stem>_cmb.nii.gz``, one label per CMB, and
``<stem>_truth.json`` with the CMB and mimic lists). Reports, overall and per modality:

* cluster-wise overlap metrics on the label maps (the paper's rule, plus a one-to-one variant);
* VALDO centroid matching (5 mm, median/IQR F1 over CMB-positive subjects, |Δcount|);
* stage by stage (candidates, student, clean-up) like the paper's Table 3, from the candidate
  centroids, by true lesion size and by CMB category;
* a FROC over the confidence threshold (JSON points and a PNG);
* false positives attributed to the nearest simulated mimic type.

:func:`evaluate_subjects` is the in-memory entry point for training code; the CLI builds
:class:`EvalCase` objects from files and calls it. With ``--cross-domain`` it scores a second
(cross-domain) folder pair alike and reports both (:mod:`.splits`).
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .. import __version__
from . import metrics as M
from ..errors import InputError

MODALITY_SUFFIXES = ("swi", "gre", "qsm", "t2s", "t2star", "mag", "phase")


@dataclass
class EvalCase:
    """One scored scan (a prediction paired with its truth).

    Parameters
    ----------
    name : str
        Prediction stem (e.g. ``sub-001_swi``).
    modality : str
        ``swi``, ``gre``, ``qsm`` or anything else (used only for grouping).
    truth : dict, optional
        Truth JSON: ``cmbs`` [{id, centre_ras, radius_mm, category, ...}], ``mimics``
        [{id, type, centre_ras}]. Without it, the truth label map's elements are the references.
    truth_labels, pred_labels, mimic_labels : Volume, optional
        Label maps. ``truth_labels`` value = CMB id; ``pred_labels`` = the engine's lesion map at
        ``threshold``; ``mimic_labels`` value = mimic id. Grids may differ: the prediction is
        resampled (nearest neighbour, through RAS) onto the truth grid.
    candidates : list of dict, optional
        Every candidate: ``centroid_ras``, ``confidence``, ``kept`` (+ ``volume_mm3``,
        ``candidate_probability``, ``index``). ``None`` when only a label map or lesion list
        exists (then only the final stage is scored); ``[]`` means the detector found nothing.
    threshold : float
        Confidence threshold of the written label map / the operating point.
    lesions_ras : (N, 3), optional
        Final lesion centres when no candidate list exists (e.g. from ``<stem>_lesions.csv``).
    """

    name: str
    modality: str = "unknown"
    truth: dict | None = None
    truth_labels: object = None
    pred_labels: object = None
    candidates: list | None = None
    threshold: float = 0.5
    mimic_labels: object = None
    lesions_ras: object = None
    truth_name: str = ""


def case_from_result(name: str, result, truth: dict | None = None, truth_labels=None,
                     threshold: float | None = None, mimic_labels=None,
                     truth_name: str = "") -> EvalCase:
    """Build an :class:`EvalCase` from an in-memory :class:`DetectionResult` (no files)."""
    from ..engine.volume import Volume

    t = result.threshold if threshold is None else float(threshold)
    pred = Volume(result.label_map(t), np.asarray(result.ijk_to_ras, float), name)
    cands = [asdict(c) for c in result.candidates]
    return EvalCase(name, result.modality, truth, truth_labels, pred, cands, t, mimic_labels,
                    None, truth_name)


# --------------------------------------------------------------------------------------------
# per-case scoring
# --------------------------------------------------------------------------------------------
def _voxel_mm3(volume) -> float:
    return float(abs(np.linalg.det(np.asarray(volume.ijk_to_ras, float)[:3, :3])))


def _truth_refs(case: EvalCase) -> dict:
    """Reference lesions: centres (RAS), true and visible diameters, categories, label values.

    The visible diameter is the equivalent sphere of the lesion's footprint in the truth label
    map (NaN without one). With a label map only, the true diameter is that visible one. On an
    SWI scan whose truth gives each CMB's footprint on the SWI itself
    (``swi_visible_diameter_mm``, from the simulator), that one is used: the label is the GRE
    footprint, and the SWI's phase mask can hide a CMB the GRE shows (or widen one).
    """
    cmbs = (case.truth or {}).get("cmbs")
    if cmbs is not None:
        pts = np.array([c["centre_ras"] for c in cmbs], float).reshape(-1, 3)
        diam = np.array([2.0 * float(c.get("radius_mm", math.nan)) for c in cmbs], float)
        cat = [str(c.get("category", "unknown")) for c in cmbs]
        touches = [str(c.get("touches") or "unknown") for c in cmbs]
        ids = [int(c.get("id", n + 1)) for n, c in enumerate(cmbs)]
        labels = [int(c.get("label", i)) for c, i in zip(cmbs, ids)]
        visible = np.full(len(ids), math.nan)
        if case.truth_labels is not None:
            visible = M.equivalent_diameters(case.truth_labels.array, labels,
                                             _voxel_mm3(case.truth_labels))
        own = f"{str(case.modality).lower()}_visible_diameter_mm"
        if cmbs and all(own in c for c in cmbs):
            visible = np.array([float(c[own]) for c in cmbs], float)
        return {"ras": pts, "diameter_mm": diam, "category": cat, "touches": touches, "id": ids,
                "label": labels, "visible_diameter_mm": visible, "source": "json"}
    if case.truth_labels is not None:
        arr = np.asarray(case.truth_labels.array)
        lab, n, values = M._elements(arr, 26, True)
        pts = M.centroids_ras(lab, n, case.truth_labels.ijk_to_ras)
        diam = M.equivalent_diameters(arr, values, _voxel_mm3(case.truth_labels))
        ids = [int(v) for v in values]
        return {"ras": pts, "diameter_mm": diam, "category": ["unknown"] * n,
                "touches": ["unknown"] * n, "id": ids, "label": ids, "visible_diameter_mm": diam,
                "source": "labels"}
    raise InputError(f"{case.name}: no ground truth (neither truth JSON nor label map)")


def _mimic_points(case: EvalCase):
    """RAS points and types of the simulated mimics: every voxel of the mimic label map when
    given (tubular veins are long, their centre alone says little), else the listed centres."""
    mimics = (case.truth or {}).get("mimics") or []
    types = {int(m.get("id", n + 1)): str(m.get("type", "mimic")) for n, m in enumerate(mimics)}
    if case.mimic_labels is not None:
        arr = np.asarray(case.mimic_labels.array)
        kji = np.argwhere(arr != 0)
        if len(kji):
            if len(kji) > 200000:  # keep the KD-tree small on huge mimic maps
                kji = kji[:: len(kji) // 200000 + 1]
            vals = arr[tuple(kji.T)]
            ras = case.mimic_labels.ijk_to_ras_points(kji[:, ::-1])
            return ras, [types.get(int(v), "mimic") for v in vals]
    if mimics:
        pts = np.array([m["centre_ras"] for m in mimics if "centre_ras" in m], float)
        return pts.reshape(-1, 3), [str(m.get("type", "mimic")) for m in mimics
                                    if "centre_ras" in m]
    return np.zeros((0, 3)), []


def attribute_points(points, mimic_ras, mimic_types, max_distance_mm: float) -> list:
    """Type of the nearest mimic within ``max_distance_mm`` of each point, else ``"other"``."""
    points = M._as_points(points)
    if not len(points):
        return []
    if not len(mimic_ras):
        return ["other"] * len(points)
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.asarray(mimic_ras, float)).query(points, k=1)
    return [mimic_types[j] if dist <= max_distance_mm else "other" for dist, j in zip(d, i)]


def _pred_on_truth_grid(case: EvalCase):
    """Prediction label array on the truth grid (nearest-neighbour resampling through RAS)."""
    p, t = case.pred_labels, case.truth_labels
    if p.same_grid(t):
        return np.asarray(p.array), False
    from ..engine.volume import Volume, resample

    src = Volume(np.asarray(p.array).astype(np.int32), p.ijk_to_ras, p.name)
    return np.asarray(resample(src, None, "nearest", reference=t).array), True


def _cand_arrays(case: EvalCase):
    c = case.candidates or []
    pts = np.array([x["centroid_ras"] for x in c], float).reshape(-1, 3)
    conf = np.array([float(x.get("confidence", 1.0)) for x in c], float)
    kept = np.array([bool(x.get("kept", True)) for x in c], bool)
    return pts, conf, kept


def without_label_maps(case: EvalCase) -> EvalCase:
    """The case with its label maps dropped: candidate-level scoring (stages, FROC,
    :func:`compare_classifiers`) needs only the candidates and the truth JSON, and a test split
    of native-resolution label maps held for several classifiers at once fills the RAM (180
    scans x 3 classifiers took 21 GB)."""
    if case.truth is None:
        raise InputError(f"{case.name}: without a truth JSON the label map is the truth")
    return replace(case, truth_labels=None, pred_labels=None, mimic_labels=None)


def compare_classifiers(cases_a: list, cases_b: list,
                        distance_mm: float = M.DEFAULT_DISTANCE_MM, **kw) -> dict:
    """Paired bootstrap of the FROC-averaged TPR difference between two classifiers' outputs on
    the same scans (matched by name; subjects = truth names), see
    :func:`metrics.paired_froc_bootstrap`."""
    by_name = {c.name: c for c in cases_b}
    missing = [c.name for c in cases_a if c.name not in by_name]
    if missing:
        raise InputError(f"scans missing from the second classifier: {', '.join(missing[:5])}")

    def froc_subject(case):
        pts, conf, kept = _cand_arrays(case)
        return {"pred_ras": pts, "confidence": conf, "kept": kept,
                "ref_ras": _truth_refs(case)["ras"]}
    return M.paired_froc_bootstrap([froc_subject(c) for c in cases_a],
                                   [froc_subject(by_name[c.name]) for c in cases_a],
                                   [c.truth_name for c in cases_a], distance_mm, **kw)


def _rated_counts(touch: np.ndarray, ref_values, refs: dict, hits, rated) -> M.ClusterCounts:
    """Cluster counts under the rating criterion: only ``rated`` references are lesions to find.

    A smaller simulated CMB is neither a miss nor, when found, a false positive: a predicted
    component touching only such lesions is left out of the prediction count. False
    positives (components touching no reference voxel) are the same as in the full count.
    ``touch[r, p]``: reference label ``ref_values[r]`` shares a voxel with predicted component
    ``p + 1``.
    """
    nr, n_pred = touch.shape
    below = {lab for lab, r in zip(refs["label"], rated) if not r}
    rated_rows = np.array([int(v) not in below for v in ref_values], bool)
    touch_any = touch.any(axis=0) if nr else np.zeros(n_pred, bool)
    touch_rated = touch[rated_rows].any(axis=0) if rated_rows.any() else np.zeros(n_pred, bool)
    neutral = int((touch_any & ~touch_rated).sum())
    h = np.asarray(hits, bool)[rated]
    n_ref, tp = int(rated.sum()), int(h.sum())
    return M.ClusterCounts(n_ref, n_pred - neutral, tp, n_ref - tp, int(touch_rated.sum()),
                           int((~touch_any).sum()), h.tolist(),
                           [lab for lab, r in zip(refs["label"], rated) if r])


def _case_header(case: EvalCase, refs: dict, rated_diameter_mm: float) -> dict:
    """The case's identity and references, each reference's visible-size bin and rating."""
    out: dict = {"name": case.name, "truth": case.truth_name, "modality": case.modality,
                 "threshold": float(case.threshold), "n_truth": int(len(refs["ras"])),
                 "notes": []}
    out["_refs"] = refs
    vis = np.asarray(refs["visible_diameter_mm"], float)
    out["_visible_bin"] = [M.size_bin(d, M.VISIBLE_SIZE_BINS_MM) if np.isfinite(d) else "unknown"
                           for d in vis]
    out["_rated"] = [("rated" if d >= rated_diameter_mm else "below criterion")
                     if np.isfinite(d) else "unknown" for d in vis]
    mask, mip = swi_processing(case)
    out["_swi_mask"] = [mask if r == "rated" else None for r in out["_rated"]]
    out["_swi_mip"] = [mip if r == "rated" else None for r in out["_rated"]]
    return out


def swi_processing(case: EvalCase) -> tuple:
    """(phase-mask sign, mIP) of a simulated SWI scan from its truth's ``params``, e.g.
    ``("negative", "no mIP")``; (None, None) for another modality or a truth without them.
    The two settings that decide most SWI misses (docs/training.md, fourteenth session)."""
    if str(case.modality).lower() != "swi":
        return None, None
    swi = (((case.truth or {}).get("params") or {}).get("appearance") or {}).get("swi")
    if not isinstance(swi, dict) or "mask" not in swi:
        return None, None
    mip = int(swi.get("mip") or 0)
    return str(swi["mask"]), (f"mIP of {mip} slices" if mip else "no mIP")


def _score_label_maps(case: EvalCase, refs: dict, out: dict, distance_mm: float,
                      connectivity: int, vc: int) -> np.ndarray:
    """Cluster, one-to-one, VALDO and rated counts from the label maps (into ``out``);
    returns the centroids of the false-positive clusters, for mimic attribution."""
    pred, resampled = _pred_on_truth_grid(case)
    if resampled:
        out["notes"].append("prediction resampled onto the truth grid (nearest neighbour)")
    ref = np.asarray(case.truth_labels.array)
    m = case.truth_labels.ijk_to_ras
    any_ = M.cluster_counts(pred, ref, connectivity, one_to_one=False)
    one = M.cluster_counts(pred, ref, connectivity, one_to_one=True)
    # per-CMB detection (each truth label its own lesion): size strata, rating criterion
    pl, npred = M.label_components(pred, connectivity)
    rl, nr, rvals = M._elements(ref, connectivity, True)
    touch = M.overlap_matrix(rl, nr, pl, npred) > 0
    per_cmb = M.cluster_counts_from_overlap(touch.astype(np.int64))
    per_cmb.ref_values = [int(v) for v in rvals]
    val = M.valdo_subject(pred, ref, m, distance_mm, vc)
    out["cluster"] = any_.as_dict()
    out["cluster_one_to_one"] = one.as_dict()
    out["valdo"] = val.as_dict()
    out["valdo"]["source"] = "label maps"
    out["_cluster"], out["_cluster_one"], out["_valdo"] = any_, one, val
    detected = dict(zip(per_cmb.ref_values, per_cmb.ref_detected))
    out["_cluster_hit_by_ref"] = [bool(detected.get(i, False)) for i in refs["label"]]
    rated = _rated_counts(touch, rvals, refs, out["_cluster_hit_by_ref"],
                          np.array([r == "rated" for r in out["_rated"]], bool))
    out["_cluster_rated"] = rated
    out["cluster_rated"] = rated.as_dict()
    # centroids of FP clusters (for mimic attribution)
    cents = M.centroids_ras(pl, npred, m)
    return cents[~touch.any(axis=0)] if npred else np.zeros((0, 3))


def _score_stages(case: EvalCase, refs: dict, out: dict, pts, conf, kept, distance_mm: float,
                  point_rule: str, connectivity: int) -> np.ndarray:
    """Point matches per pipeline stage (into ``out``), or only the final stage when there is
    no candidate list; returns the final lesions' centres."""
    out["stages"] = {}
    out["_stage_match"] = {}
    if case.candidates is not None:
        for stage in M.STAGES:
            sel = M.stage_selection(conf, kept, case.threshold, stage)
            mt = M.match_points(pts[sel], refs["ras"], distance_mm, point_rule)
            out["stages"][stage] = {"n_pred": mt.n_pred, "tp": mt.tp, "fn": mt.fn, "fp": mt.fp}
            out["_stage_match"][stage] = mt
        return pts[M.stage_selection(conf, kept, case.threshold, "cleanup")]
    if case.lesions_ras is not None:
        final_pts = M._as_points(case.lesions_ras)
        note = "no candidate list: only the final stage is scored"
    elif case.pred_labels is not None:
        pl, npred = M.label_components(np.asarray(case.pred_labels.array), connectivity)
        final_pts = M.centroids_ras(pl, npred, case.pred_labels.ijk_to_ras)
        note = "no candidate list: final stage scored from label-map centroids"
    else:
        raise InputError(f"{case.name}: no prediction (neither label map, candidates nor lesions)")
    mt = M.match_points(final_pts, refs["ras"], distance_mm, point_rule)
    out["stages"]["cleanup"] = {"n_pred": mt.n_pred, "tp": mt.tp, "fn": mt.fn, "fp": mt.fp}
    out["_stage_match"]["cleanup"] = mt
    out["notes"].append(note)
    return final_pts


def _attribute_false_positives(out: dict, final_pts, fp_points_cluster, mimic_ras, mimic_types,
                               mimic_distance_mm: float) -> None:
    """Name the nearest simulated mimic of each false positive (point and cluster rules)."""
    fm = out["_stage_match"]["cleanup"]
    fp_pts = final_pts[~np.asarray(fm.pred_near, bool)] if fm.n_pred else np.zeros((0, 3))
    out["fp_types"] = _count(attribute_points(fp_pts, mimic_ras, mimic_types, mimic_distance_mm))
    if fp_points_cluster is not None:
        out["cluster_fp_types"] = _count(attribute_points(fp_points_cluster, mimic_ras,
                                                          mimic_types, mimic_distance_mm))


def score_case(case: EvalCase, distance_mm: float = M.DEFAULT_DISTANCE_MM,
               connectivity: int = 26, valdo_connectivity: int | None = None,
               point_rule: str = "any", mimic_distance_mm: float = 3.0,
               rated_diameter_mm: float = M.DEFAULT_RATED_DIAMETER_MM) -> dict:
    """All per-case numbers (JSON-ready) plus private arrays for pooling (keys starting ``_``).

    References whose visible diameter is below ``rated_diameter_mm`` are also scored apart
    (see :func:`_rated_counts`); every other number counts all references.
    """
    vc = connectivity if valdo_connectivity is None else valdo_connectivity
    refs = _truth_refs(case)
    mimic_ras, mimic_types = _mimic_points(case)
    out = _case_header(case, refs, rated_diameter_mm)

    # --- label-map families -------------------------------------------------------------
    fp_points_cluster = None
    if case.pred_labels is not None and case.truth_labels is not None:
        fp_points_cluster = _score_label_maps(case, refs, out, distance_mm, connectivity, vc)

    # --- candidate stages (points) --------------------------------------------------------
    pts, conf, kept = _cand_arrays(case)
    final_pts = _score_stages(case, refs, out, pts, conf, kept, distance_mm, point_rule,
                              connectivity)

    if "valdo" not in out:  # VALDO from points when label maps are missing
        val = M.match_points(final_pts, refs["ras"], distance_mm, "valdo")
        out["valdo"] = val.as_dict()
        out["valdo"]["source"] = "centroid lists"
        out["_valdo"] = val

    # --- false-positive attribution -----------------------------------------------------------
    _attribute_false_positives(out, final_pts, fp_points_cluster, mimic_ras, mimic_types,
                               mimic_distance_mm)
    out["_froc"] = {"pred_ras": pts, "confidence": conf, "kept": kept, "ref_ras": refs["ras"]}
    return out


def _count(items) -> dict:
    d: dict = {}
    for x in items:
        d[x] = d.get(x, 0) + 1
    return d


def _add_counts(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = a.get(k, 0) + v
    return a


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------
def _strata(scored: list, key: str, values_of, hits_of) -> dict:
    """TPR per stratum (size bin or category) of reference lesions."""
    out: dict = {}
    for s in scored:
        hits = hits_of(s)
        if hits is None:
            continue
        for v, h in zip(values_of(s), hits):
            d = out.setdefault(v, {"n_ref": 0, "detected": 0})
            d["n_ref"] += 1
            d["detected"] += int(bool(h))
    for d in out.values():
        d["tpr"] = d["detected"] / d["n_ref"] if d["n_ref"] else None
    return out


def _pool(scored: list, distance_mm: float, point_rule: str, size_edges, do_froc: bool,
          rated_diameter_mm: float = M.DEFAULT_RATED_DIAMETER_MM) -> dict:
    res: dict = {"scans": len(scored),
                 "cmb_positive_scans": sum(1 for s in scored if s["n_truth"]),
                 "truth_cmbs": sum(s["n_truth"] for s in scored)}
    with_maps = [s for s in scored if "_cluster" in s]
    if with_maps:
        res["cluster"] = M.pool_cluster([s["_cluster"] for s in with_maps])
        res["cluster"].update(M.bootstrap_cluster_ci([s["_cluster"] for s in with_maps],
                                                     [s["truth"] for s in with_maps]))
        res["cluster_one_to_one"] = M.pool_cluster([s["_cluster_one"] for s in with_maps])
        res["cluster_rated"] = M.pool_cluster([s["_cluster_rated"] for s in with_maps])
        res["cluster_rated"].update(M.bootstrap_cluster_ci(
            [s["_cluster_rated"] for s in with_maps], [s["truth"] for s in with_maps]))
        res["cluster_rated"]["min_visible_diameter_mm"] = float(rated_diameter_mm)
        res["cluster_rated"]["below_criterion"] = sum(
            r == "below criterion" for s in with_maps for r in s["_rated"])
        res["cluster_fp_types"] = {}
        for s in with_maps:
            _add_counts(res["cluster_fp_types"], s.get("cluster_fp_types", {}))
    res["valdo"] = M.summarise_valdo([s["_valdo"] for s in scored])
    res["valdo"]["sources"] = sorted({s["valdo"]["source"] for s in scored})

    bins = M.size_bin_labels(size_edges)
    sizes = lambda s: [M.size_bin(d, size_edges) if np.isfinite(d) else "unknown"  # noqa: E731
                       for d in s["_refs"]["diameter_mm"]]
    cats = lambda s: s["_refs"]["category"]  # noqa: E731
    touch = lambda s: s["_refs"]["touches"]  # noqa: E731
    vbins = M.size_bin_labels(M.VISIBLE_SIZE_BINS_MM)
    visible = lambda s: s["_visible_bin"]  # noqa: E731
    rated = lambda s: s["_rated"]  # noqa: E731
    res["stages"] = {}
    res["stages_by_size"] = {}
    res["stages_by_visible_size"] = {}
    res["stages_rated"] = {}
    res["stages_by_category"] = {}
    res["stages_by_touches"] = {}
    for stage in M.STAGES:
        have = [s for s in scored if stage in s["_stage_match"]]
        if not have:
            continue
        res["stages"][stage] = M.pool_points([s["_stage_match"][stage] for s in have], point_rule)
        hits = lambda s, st=stage: (s["_stage_match"][st].ref_hit  # noqa: E731
                                    if st in s["_stage_match"] else None)
        by = _strata(have, "size", sizes, hits)
        res["stages_by_size"][stage] = {b: by[b] for b in bins + ["unknown"] if b in by}
        by = _strata(have, "visible", visible, hits)
        res["stages_by_visible_size"][stage] = {b: by[b] for b in vbins + ["unknown"] if b in by}
        by = _strata(have, "rated", rated, hits)
        if "rated" in by:
            res["stages_rated"][stage] = by["rated"]
        res["stages_by_category"][stage] = _strata(have, "category", cats, hits)
        res["stages_by_touches"][stage] = _strata(have, "touches", touch, hits)
    if with_maps:
        by = _strata(with_maps, "size", sizes, lambda s: s["_cluster_hit_by_ref"])
        res["cluster_by_size"] = {b: by[b] for b in bins + ["unknown"] if b in by}
        by = _strata(with_maps, "visible", visible, lambda s: s["_cluster_hit_by_ref"])
        res["cluster_by_visible_size"] = {b: by[b] for b in vbins + ["unknown"] if b in by}
        res["cluster_by_category"] = _strata(with_maps, "category", cats,
                                             lambda s: s["_cluster_hit_by_ref"])
        res["cluster_by_touches"] = _strata(with_maps, "touches", touch,
                                            lambda s: s["_cluster_hit_by_ref"])
        for key in ("_swi_mask", "_swi_mip"):  # visible (rated) SWI CMBs of simulated scans
            by = _strata(with_maps, key, lambda s, k=key: s[k],
                         lambda s: s["_cluster_hit_by_ref"])
            by.pop(None, None)
            if by:
                res["cluster_rated_by" + key] = dict(sorted(by.items()))
    res["fp_types"] = {}
    for s in scored:
        _add_counts(res["fp_types"], s["fp_types"])
    if do_froc and all("candidates" in s["_stage_match"] for s in scored):
        res["froc"] = {
            "student": M.froc([s["_froc"] for s in scored], distance_mm, point_rule,
                              require_kept=False),
            "cleanup": M.froc([s["_froc"] for s in scored], distance_mm, point_rule,
                              require_kept=True)}
    return res


def evaluate_subjects(cases, distance_mm: float = M.DEFAULT_DISTANCE_MM, connectivity: int = 26,
                      valdo_connectivity: int | None = None, point_rule: str = "any",
                      size_edges_mm=M.DEFAULT_SIZE_BINS_MM, mimic_distance_mm: float = 3.0,
                      froc: bool = True, progress=None,
                      rated_diameter_mm: float = M.DEFAULT_RATED_DIAMETER_MM) -> dict:
    """Score a list of :class:`EvalCase` (in memory) and pool overall and per modality.

    Parameters
    ----------
    distance_mm : float
        Centroid matching distance (strict ``<``) for VALDO, the stage table and the FROC.
    connectivity : {6, 18, 26}
        Connected components of label maps (cluster-wise family); 26 as in the paper.
    valdo_connectivity : int, optional
        Connectivity for VALDO components (default = ``connectivity``; the challenge used 6).
    point_rule : {"any", "valdo", "hungarian"}
        Matching of candidate centroids for stages/FROC; ``any`` is the point analogue of the
        paper's cluster rule (see :func:`metrics.match_points`).
    progress : callable(done, total, name), optional
    rated_diameter_mm : float
        Rating criterion: ``cluster_rated`` and ``stages_rated`` count only references whose
        visible diameter (footprint in the truth label map) is at least this; raters mark foci
        of roughly 2-10 mm (Greenberg 2009). 0 counts every reference.

    Returns
    -------
    dict (JSON-ready): ``settings``, ``overall``, ``by_modality``, ``cases``.
    """
    if point_rule not in M.POINT_RULES:
        raise InputError(f"point rule must be one of {M.POINT_RULES}, got {point_rule!r}")
    cases = list(cases)
    if not cases:
        raise InputError("nothing to evaluate: no prediction/truth pairs")
    scored = []
    for n, c in enumerate(cases, 1):
        scored.append(score_case(c, distance_mm, connectivity, valdo_connectivity, point_rule,
                                 mimic_distance_mm, rated_diameter_mm))
        if progress:
            progress(n, len(cases), c.name)
    settings = {"distance_mm": float(distance_mm), "connectivity": int(connectivity),
                "valdo_connectivity": int(valdo_connectivity or connectivity),
                "point_rule": point_rule, "size_bins_mm": [float(x) for x in size_edges_mm],
                "mimic_distance_mm": float(mimic_distance_mm),
                "visible_size_bins_mm": [float(x) for x in M.VISIBLE_SIZE_BINS_MM],
                "rated_diameter_mm": float(rated_diameter_mm),
                "cluster_rule": "any-overlap (reference detected if >=1 predicted voxel "
                                "overlaps it; prediction FP if it overlaps no reference voxel)",
                "version": __version__}
    result = {"settings": settings,
              "overall": _pool(scored, distance_mm, point_rule, size_edges_mm, froc,
                               rated_diameter_mm),
              "by_modality": {}}
    for mod in sorted({s["modality"] for s in scored}):
        group = [s for s in scored if s["modality"] == mod]
        result["by_modality"][mod] = _pool(group, distance_mm, point_rule, size_edges_mm, froc,
                                           rated_diameter_mm)
    result["cases"] = [{k: v for k, v in s.items() if not k.startswith("_")} for s in scored]
    return result


# --------------------------------------------------------------------------------------------
# readable report
# --------------------------------------------------------------------------------------------
def _f(v, pct=False, nd=2):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f} %" if pct else f"{v:.{nd}f}"


def _strata_table(title: str, stages: dict, cluster, columns: list) -> list:
    """A table of TPR (detected/CMBs) per stratum: one row per stage, plus the cluster rule."""
    lines = [title, "", "| stage | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    rows = list(stages.items()) + ([("cluster (label maps)", cluster)] if cluster else [])
    for st, d in rows:
        cells = [f"{_f(d[b]['tpr'], True)} ({d[b]['detected']}/{d[b]['n_ref']})"
                 if b in d else "-" for b in columns]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return lines + [""]


def _group_table(name: str, g: dict) -> list:
    lines = [f"### {name}: {g['scans']} scans, {g['cmb_positive_scans']} with CMBs, "
             f"{g['truth_cmbs']} CMBs", ""]
    if "cluster" in g:
        lines += ["Cluster-wise (label maps, overlap >= 1 voxel):", "",
                  "| rule | TPR | precision | FP/scan | TP | FN | FP |",
                  "|---|---|---|---|---|---|---|"]
        rows = [("cluster", "any overlap (paper)"), ("cluster_one_to_one", "one-to-one")]
        if "cluster_rated" in g:
            r = g["cluster_rated"]
            rows.append(("cluster_rated", f"any overlap, visible >= "
                                          f"{r['min_visible_diameter_mm']:g} mm "
                                          f"({r['below_criterion']} smaller left out)"))
        for key, lab in rows:
            c = g[key]
            lines.append(f"| {lab} | {_f(c['tpr'], True)} | {_f(c['precision'], True)} | "
                         f"{_f(c['fp_per_subject'])} | {c['tp']} | {c['fn']} | {c['fp']} |")
        lines.append("")
        c = g["cluster"]
        if c.get("tpr_ci"):
            lines += [f"{100 * c['ci_level']:.0f} % bootstrap intervals (any overlap; "
                      f"{c['ci_resampled_subjects']} subjects resampled, {c['ci_bootstrap']} "
                      f"draws): TPR {_f(c['tpr_ci'][0], True)} to {_f(c['tpr_ci'][1], True)}, "
                      f"FP/scan {_f(c['fp_per_subject_ci'][0])} to "
                      f"{_f(c['fp_per_subject_ci'][1])}", ""]
        r = g.get("cluster_rated", {})
        if r.get("tpr_ci"):
            lines += [f"Visible >= {r['min_visible_diameter_mm']:g} mm (the rating criterion: "
                      f"raters mark foci of about 2-10 mm): TPR {_f(r['tpr_ci'][0], True)} to "
                      f"{_f(r['tpr_ci'][1], True)}", ""]
    v = g["valdo"]
    lines += [f"VALDO centroid matching ({', '.join(v['sources'])}): median F1 "
              f"{_f(v['f1_median'])} (IQR {_f(v['f1_q1'])}-{_f(v['f1_q3'])}, "
              f"{v['cmb_positive_subjects']} CMB-positive scans); |count difference| mean "
              f"{_f(v['count_difference_mean'])}, median {_f(v['count_difference_median'])}; "
              f"pooled TP {v['tp']} FN {v['fn']} FP {v['fp']}", ""]
    if g["stages"]:
        lines += ["Stage by stage (candidate centroids):", "",
                  "| stage | TPR | FP/scan | precision | detected/CMBs |", "|---|---|---|---|---|"]
        for st, p in g["stages"].items():
            lines.append(f"| {st} | {_f(p['tpr'], True)} | {_f(p['fp_per_subject'])} | "
                         f"{_f(p['precision'], True)} | {p['tp']}/{p['n_ref']} |")
        lines.append("")
        bins = []
        for st in g["stages_by_size"].values():
            bins += [b for b in st if b not in bins]
        if bins:
            lines += _strata_table("TPR by true diameter:", g["stages_by_size"],
                                   g.get("cluster_by_size"), bins)
        vb = []
        for st in g.get("stages_by_visible_size", {}).values():
            vb += [b for b in M.size_bin_labels(M.VISIBLE_SIZE_BINS_MM) + ["unknown"]
                   if b in st and b not in vb]
        if vb and vb != ["unknown"]:
            lines += _strata_table("TPR by visible diameter (footprint in the truth label map):",
                                   g["stages_by_visible_size"], g.get("cluster_by_visible_size"),
                                   vb)
        cats = sorted({c for d in g["stages_by_category"].values() for c in d})
        if cats and cats != ["unknown"]:
            lines += _strata_table("TPR by category:", g["stages_by_category"], None, cats)
        near = sorted({c for d in g.get("stages_by_touches", {}).values() for c in d})
        if near and near != ["unknown"]:
            lines += _strata_table("TPR by what the CMB touches (simulator: vein, cortex = CSF "
                                   "of a sulcus, the surface or a ventricle, none):",
                                   g["stages_by_touches"], g.get("cluster_by_touches"), near)
    if g.get("fp_types"):
        lines.append("False positives after clean-up by nearest mimic: " + ", ".join(
            f"{k} {v}" for k, v in sorted(g["fp_types"].items(), key=lambda kv: -kv[1])))
        lines.append("")
    if "froc" in g:
        fr = g["froc"]["cleanup"]["tpr_at_fp"]
        lines.append("FROC (clean-up) TPR at FP/scan: " + ", ".join(
            f"{k}: {_f(v, True)}" for k, v in fr.items()))
        lines.append("")
    return lines


def format_report(result: dict) -> str:
    """Readable Markdown tables of :func:`evaluate_subjects`' result."""
    s = result["settings"]
    lines = ["# CMBDetector evaluation", "",
             f"Matching: cluster-wise {s['connectivity']}-connectivity, any voxel overlap; VALDO "
             f"and stages: centroid distance < {s['distance_mm']:g} mm (stage rule "
             f"'{s['point_rule']}', VALDO components {s['valdo_connectivity']}-connectivity).", ""]
    lines += _group_table("All scans", result["overall"])
    for mod, g in result["by_modality"].items():
        lines += _group_table(f"Modality {mod}", g)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# files -> cases
# --------------------------------------------------------------------------------------------
def _suffix_stems(folder: Path, suffix: str) -> dict:
    return {p.name[: -len(suffix)]: p for p in sorted(folder.glob(f"*{suffix}"))
            if not p.name.startswith(".")}


def pair_stems(pred_stems, truth_stems) -> dict:
    """Pair prediction stems with truth stems.

    Rule: prediction ``P`` pairs with the *longest* truth stem ``T`` such that ``P == T`` or
    ``P`` starts with ``T + "_"`` (``sub-001_swi`` -> ``sub-001``; ``sub-10_swi`` never pairs
    with ``sub-1``). Returns ``{P: T}``; unpaired predictions are left out.
    """
    truths = sorted(truth_stems, key=len, reverse=True)
    out = {}
    for p in pred_stems:
        for t in truths:
            if p == t or p.startswith(t + "_"):
                out[p] = t
                break
    return out


def _modality(det: dict | None, pstem: str, tstem: str) -> str:
    if det and det.get("modality"):
        return str(det["modality"]).lower()
    rest = pstem[len(tstem):].strip("_").lower()
    for part in reversed(rest.split("_")):
        if part in MODALITY_SUFFIXES:
            return part
    return "unknown"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable JSON ({exc})") from None


def _read_lesions_csv(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    try:
        return np.array([[float(r["R"]), float(r["A"]), float(r["S"])] for r in rows],
                        float).reshape(-1, 3)
    except (KeyError, ValueError):
        raise InputError(f"{path}: expected R, A, S columns (RAS mm)") from None


def _rethreshold(pred_vol, det: dict, threshold: float):
    """Drop lesions whose confidence is below ``threshold`` from a label map written at the
    detection JSON's (lower or equal) threshold; label n is the n-th lesion of
    :meth:`DetectionResult.lesions` at the written threshold."""
    from ..engine.results import Candidate, DetectionResult

    written = float(det.get("threshold", 0.5))
    if threshold < written - 1e-12:
        raise InputError(f"threshold {threshold} is below the written one ({written}): the label "
                         "map cannot be lowered; score points only (--no-label-maps)")
    names = {f.name for f in fields(Candidate)}
    cands = [Candidate(**{k: v for k, v in c.items() if k in names}) for c in det["candidates"]]
    res = DetectionResult(det.get("modality", ""), np.eye(4), tuple(pred_vol.array.shape), cands,
                          threshold=written)
    lut = np.zeros(max(int(pred_vol.array.max()), 0) + 1, np.uint16)
    for les in res.lesions(written):
        if les.confidence >= threshold and les.id < lut.size:
            lut[les.id] = les.id
    return pred_vol.with_array(lut[np.asarray(pred_vol.array).astype(np.int64)])


def require_folders(*folders) -> None:
    """Fail on the first path that is not a folder, before any scan is read or scored."""
    for d in map(Path, folders):
        if not d.is_dir():
            raise InputError(f"{d}: not a folder")


def load_cases(pred_dir, truth_dir, manifest=None, threshold: float | None = None,
               use_label_maps: bool = True, missing_as_empty: bool = False,
               warn=None) -> tuple[list, dict]:
    """Build :class:`EvalCase` objects from a prediction folder and a truth folder.

    Predictions are found by ``<P>_detection.json``, else ``<P>_lesions.csv``, else
    ``<P>_cmb.nii.gz``; truths by ``<T>_truth.json`` or ``<T>_cmb.nii.gz``. Pairing follows
    :func:`pair_stems`, or a CSV ``manifest`` with columns ``prediction,truth[,modality]``
    (stems). Returns ``(cases, {"unpaired_predictions": [...], "unpaired_truths": [...]})``.
    """
    from ..engine.volume import read_volume

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    require_folders(pred_dir, truth_dir)
    warn = warn or (lambda msg: None)
    dets = _suffix_stems(pred_dir, "_detection.json")
    csvs = _suffix_stems(pred_dir, "_lesions.csv")
    pmaps = _suffix_stems(pred_dir, "_cmb.nii.gz")
    tjson = _suffix_stems(truth_dir, "_truth.json")
    tmaps = _suffix_stems(truth_dir, "_cmb.nii.gz")
    pstems = sorted(set(dets) | set(csvs) | set(pmaps))
    tstems = sorted(set(tjson) | set(tmaps))
    mods: dict = {}
    if manifest:
        pairs = {}
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    p, t = row["prediction"].strip(), row["truth"].strip()
                except (KeyError, AttributeError):
                    raise InputError(f"{manifest}: needs columns prediction,truth") from None
                p, t = Path(p).name.replace("_detection.json", ""), Path(t).name.replace(
                    "_truth.json", "")
                if p not in pstems:
                    raise InputError(f"{manifest}: prediction '{p}' not found in {pred_dir}")
                if t not in tstems:
                    raise InputError(f"{manifest}: truth '{t}' not found in {truth_dir}")
                pairs[p] = t
                if row.get("modality"):
                    mods[p] = row["modality"].strip().lower()
    else:
        pairs = pair_stems(pstems, tstems)
    unpaired_p = [p for p in pstems if p not in pairs]
    unpaired_t = [t for t in tstems if t not in set(pairs.values())]
    for p in unpaired_p:
        warn(f"prediction {p}: no matching truth, skipped")
    cases = []
    for p, t in sorted(pairs.items()):
        det = _read_json(dets[p]) if p in dets else None
        truth = _read_json(tjson[t]) if t in tjson else None
        tl = read_volume(tmaps[t]) if (t in tmaps and use_label_maps) else None
        pl = read_volume(pmaps[p]) if (p in pmaps and use_label_maps and tl is not None) else None
        written = float(det.get("threshold", 0.5)) if det else 0.5
        thr = written if threshold is None else float(threshold)
        if pl is not None and det is not None and thr != written:
            pl = _rethreshold(pl, det, thr)
        cands = list(det.get("candidates") or []) if det else None
        lesions = _read_lesions_csv(csvs[p]) if (cands is None and p in csvs) else None
        if cands is None and lesions is None and pl is None and p in pmaps:
            pl = read_volume(pmaps[p])  # point scoring from label-map centroids
        mimics = None
        for suffix in ("_mimics.nii.gz", "_mimic.nii.gz", "_mimic_labels.nii.gz"):
            if use_label_maps and (truth_dir / f"{t}{suffix}").exists():
                mimics = read_volume(truth_dir / f"{t}{suffix}")
                break
        cases.append(EvalCase(p, mods.get(p) or _modality(det, p, t), truth, tl, pl, cands,
                              thr, mimics, lesions, t))
    if missing_as_empty:
        from ..engine.volume import Volume

        for t in unpaired_t:
            truth = _read_json(tjson[t]) if t in tjson else None
            tl = read_volume(tmaps[t]) if t in tmaps else None
            empty = Volume(np.zeros_like(np.asarray(tl.array)), tl.ijk_to_ras) if tl else None
            cases.append(EvalCase(t, "missing", truth, tl, empty, None, threshold or 0.5, None,
                                  np.zeros((0, 3)), t))
    elif unpaired_t:
        warn(f"{len(unpaired_t)} truth subject(s) without prediction (not scored; "
             "--missing-as-empty scores them as empty predictions): "
             + ", ".join(unpaired_t[:5]) + (" ..." if len(unpaired_t) > 5 else ""))
    return cases, {"unpaired_predictions": unpaired_p, "unpaired_truths": unpaired_t}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def configure_parser(parser) -> None:
    parser.add_argument("predictions", help="folder of engine outputs (<stem>_detection.json, "
                                            "<stem>_cmb.nii.gz)")
    parser.add_argument("truth", help="folder of ground truth (<stem>_truth.json, "
                                      "<stem>_cmb.nii.gz)")
    parser.add_argument("-o", "--output", help="output folder for evaluation.json, "
                                               "evaluation.md, froc.png "
                                               "(default: <predictions>/evaluation)")
    parser.add_argument("--manifest", help="CSV with columns prediction,truth[,modality] (stems) "
                                           "instead of automatic pairing")
    parser.add_argument("--distance-mm", type=float, default=M.DEFAULT_DISTANCE_MM,
                        help="centroid matching distance, strict < (default 5)")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26,
                        help="connected components of label maps (default 26, as the paper)")
    parser.add_argument("--valdo-connectivity", type=int, choices=(6, 18, 26), default=None,
                        help="components for VALDO matching (default: --connectivity; the "
                             "challenge used 6)")
    parser.add_argument("--point-rule", choices=M.POINT_RULES, default="any",
                        help="centroid matching for stages and FROC (default any)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence threshold (default: the one written with each result)")
    parser.add_argument("--size-bins", default="3,5",
                        help="true-diameter bin edges in mm (default 3,5)")
    parser.add_argument("--rated-diameter-mm", type=float,
                        default=M.DEFAULT_RATED_DIAMETER_MM,
                        help="also score only CMBs whose visible footprint is at least this "
                             "diameter (default 2, the raters' lower bound; 0 = all)")
    parser.add_argument("--mimic-distance-mm", type=float, default=3.0,
                        help="a false positive is attributed to a mimic this close (default 3)")
    parser.add_argument("--no-label-maps", action="store_true",
                        help="score centroid lists only (skip the cluster-wise family)")
    parser.add_argument("--cross-domain", nargs=2, metavar=("PRED_DIR", "TRUTH_DIR"),
                        help="also score this cross-domain prediction/truth pair with the same "
                             "options: OUT/cross_domain/, OUT/in_distribution/ and "
                             "OUT/summary.json, summary.md (cross-domain first)")
    parser.add_argument("--missing-as-empty", action="store_true",
                        help="score truth subjects without prediction as empty predictions")
    parser.add_argument("--no-plot", action="store_true", help="do not write froc.png")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, no table")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return M._clean(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o).__name__)


def write_report(result: dict, out_dir, plot: bool = True) -> dict:
    """Write ``evaluation.json``, ``evaluation.md`` and (if a FROC exists) ``froc.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "table": out / "evaluation.md"}
    text = format_report(result)
    if plot and "froc" in result["overall"]:
        curves, ops = {}, {}
        for mod, g in [("all", result["overall"])] + list(result["by_modality"].items()):
            if "froc" not in g or (mod != "all" and len(result["by_modality"]) < 2):
                continue
            for kind in ("student", "cleanup"):
                curves[f"{mod} {'after student' if kind == 'student' else 'after clean-up'}"] = \
                    g["froc"][kind]
            st = g["stages"].get("cleanup")
            if st:
                ops[f"{mod} after clean-up"] = (st["fp_per_subject"] or 0.0, st["tpr"] or 0.0)
        try:
            paths["froc"] = M.plot_froc(curves, out / "froc.png",
                                        f"FROC (centroid < {result['settings']['distance_mm']:g}"
                                        " mm)", ops)
            text += "\n\n![FROC](froc.png)\n"
        except ImportError:
            print("cmbdetector evaluate: matplotlib missing, no froc.png", file=sys.stderr)
    result = dict(result, outputs={k: str(v) for k, v in paths.items()})
    tmp = paths["json"].with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default, allow_nan=False))
    tmp.replace(paths["json"])
    paths["table"].write_text(text + "\n", encoding="utf-8")
    return paths


def _size_edges(args) -> tuple:
    """The size-bin edges, with every numeric option checked before any scan is read."""
    try:
        edges = tuple(float(x) for x in str(args.size_bins).split(",") if x.strip())
    except ValueError:
        raise InputError(f"--size-bins: expected comma-separated mm, got {args.size_bins!r}")
    if not edges or list(edges) != sorted(edges):
        raise InputError("--size-bins: give increasing edges in mm, e.g. 3,5")
    if args.distance_mm <= 0:
        raise InputError("--distance-mm must be positive")
    if args.rated_diameter_mm < 0:
        raise InputError("--rated-diameter-mm must not be negative")
    return edges


def score_folders(pred_dir, truth_dir, args, edges, warn=None, progress=None) -> dict:
    """One prediction/truth folder pair scored with the command's options, so that several
    splits of one run are scored alike; unpaired stems are listed in the result."""
    cases, unpaired = load_cases(pred_dir, truth_dir, args.manifest, args.threshold,
                                 not args.no_label_maps, args.missing_as_empty, warn)
    result = evaluate_subjects(cases, args.distance_mm, args.connectivity,
                               args.valdo_connectivity, args.point_rule, edges,
                               args.mimic_distance_mm, True, progress, args.rated_diameter_mm)
    result.update(unpaired)
    return result


def run_command(args) -> int:
    edges = _size_edges(args)
    quiet = args.quiet
    warn = (lambda msg: None) if quiet else (
        lambda msg: print(f"cmbdetector evaluate: {msg}", file=sys.stderr))

    def progress(done, total, name):
        if not quiet:
            print(f"\revaluate {done}/{total} {name[:40]:<40}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    out = Path(args.output) if args.output else Path(args.predictions) / "evaluation"
    if getattr(args, "cross_domain", None):
        from .splits import run_splits

        return run_splits(args, edges, out, warn, progress)
    result = score_folders(args.predictions, args.truth, args, edges, warn, progress)
    paths = write_report(result, out, plot=not args.no_plot)
    if not quiet:
        print(paths["table"].read_text(encoding="utf-8"))
        print(f"written: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
