"""``cmbdetector evaluate --cross-domain``: the cross-domain and in-distribution splits in one run.

A model chosen on its training domains has to be reported on held-out domains too; scoring both
splits in one command, with one set of options, keeps the two sets of numbers comparable. Each
split gets the single-split report (``OUT/<split>/evaluation.json``, ``evaluation.md``,
``froc.png``); ``OUT/summary.json`` and ``OUT/summary.md`` put the headline numbers side by
side, the cross-domain split first (the harder one, which a retrain has to improve).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from .evaluate import _f, _json_default, require_folders, score_folders, write_report

#: split key (also its output folder) -> title, in report order
SPLITS = {"cross_domain": "Cross-domain", "in_distribution": "In-distribution"}


def _rates(n_ref, tpr, fp_per_scan) -> dict:
    return {"cmbs": n_ref, "tpr": tpr, "fp_per_scan": fp_per_scan}


def group_summary(group: dict, rated_diameter_mm: float) -> dict:
    """Scans, true CMBs, TPR and FP/scan for rater-visible and for all CMBs of one pooled group.

    The headline rule is the cluster-wise any-overlap count on label maps (``cluster`` and
    ``cluster_rated``); without label maps (``--no-label-maps``) the clean-up stage's centroid
    matches stand in. A CMB below the rating criterion is neither a miss nor a false positive,
    so the visible FP/scan equals the full one there too; visible ``cmbs`` is ``None`` when no
    CMB was rated (no visible sizes without label maps).
    """
    if "cluster" in group:
        a, v = group["cluster"], group["cluster_rated"]
        rule = "cluster-wise, any overlap (label maps)"
        visible = _rates(v["n_ref"], v["tpr"], v["fp_per_subject"])
    else:
        a = group["stages"]["cleanup"]
        v = group.get("stages_rated", {}).get("cleanup", {})
        rule = "centroid matches after clean-up (no label maps)"
        visible = _rates(v.get("n_ref"), v.get("tpr"), a["fp_per_subject"])
    return {"scans": group["scans"], "truth_cmbs": group["truth_cmbs"], "rule": rule,
            "visible": dict(visible, min_diameter_mm=float(rated_diameter_mm)),
            "all": _rates(a["n_ref"], a["tpr"], a["fp_per_subject"])}


def split_summary(results: dict, folders: dict) -> dict:
    """``summary.json``: per split (cross-domain first), overall and per modality."""
    splits = {}
    for key in SPLITS:
        r = results[key]
        crit = r["settings"]["rated_diameter_mm"]
        splits[key] = {"predictions": str(folders[key][0]), "truth": str(folders[key][1]),
                       "overall": group_summary(r["overall"], crit),
                       "by_modality": {m: group_summary(g, crit)
                                       for m, g in r["by_modality"].items()}}
    return {"settings": results["cross_domain"]["settings"], "splits": splits}


def _row(title: str, modality: str, g: dict) -> str:
    v, a = g["visible"], g["all"]
    n_vis = "n/a" if v["cmbs"] is None else v["cmbs"]
    return (f"| {title} | {modality} | {g['scans']} | {g['truth_cmbs']} | {n_vis} | "
            f"{_f(v['tpr'], True)} | {_f(v['fp_per_scan'])} | {_f(a['tpr'], True)} | "
            f"{_f(a['fp_per_scan'])} |")


def format_summary(summary: dict) -> str:
    """The short Markdown table of :func:`split_summary`, one row per split and modality."""
    first = summary["splits"]["cross_domain"]["overall"]
    crit = first["visible"]["min_diameter_mm"]
    lines = ["# CMBDetector evaluation: cross-domain and in-distribution", "",
             f"Rule: {first['rule']}; visible = footprint >= {crit:g} mm (the rating "
             "criterion).", "",
             "| split | modality | scans | CMBs | visible CMBs | TPR visible | FP/scan visible "
             "| TPR all | FP/scan all |", "|---" * 9 + "|"]
    for key, title in SPLITS.items():
        s = summary["splits"][key]
        lines.append(_row(title, "all", s["overall"]))
        lines += [_row(title, m, g) for m, g in s["by_modality"].items()]
    lines += ["", "Full reports: " + ", ".join(f"[{k}/evaluation.md]({k}/evaluation.md)"
                                               for k in SPLITS) + "."]
    return "\n".join(lines)


def write_splits(results: dict, folders: dict, out_dir, plot: bool = True) -> dict:
    """Each split's single-split report in ``OUT/<split>/``, then ``summary.json``/``.md``."""
    out = Path(out_dir)
    paths = {key: write_report(results[key], out / key, plot) for key in SPLITS}
    summary = split_summary(results, folders)
    paths["summary_json"] = out / "summary.json"
    paths["summary_json"].write_text(json.dumps(summary, indent=1, default=_json_default,
                                                allow_nan=False))
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(format_summary(summary) + "\n", encoding="utf-8")
    return paths


def run_splits(args, edges, out, warn, progress) -> int:
    """Score the cross-domain pair, then the in-distribution pair, alike; report both.

    Every folder is checked first, so a typo in the second pair fails before the first pair's
    scans are scored.
    """
    if args.manifest:
        raise InputError("--manifest pairs one prediction folder; with --cross-domain both "
                         "splits are paired by name")
    folders = {"cross_domain": tuple(args.cross_domain),
               "in_distribution": (args.predictions, args.truth)}
    require_folders(*(d for pair in folders.values() for d in pair))
    results = {}
    for key, (pred, truth) in folders.items():
        results[key] = score_folders(pred, truth, args, edges,
                                     lambda msg, k=key: warn(f"{k}: {msg}"), progress)
    paths = write_splits(results, folders, out, plot=not args.no_plot)
    if not args.quiet:
        print(paths["summary"].read_text(encoding="utf-8"))
        for key, title in SPLITS.items():
            pred, truth = folders[key]
            print(f"## {title} split ({pred} against {truth})\n")
            print(paths[key]["table"].read_text(encoding="utf-8"))
        written = [p for k in SPLITS for p in paths[k].values()]
        written += [paths["summary_json"], paths["summary"]]
        print(f"written: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
