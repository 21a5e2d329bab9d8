"""docs/VALIDATION.md from a training run's evaluation files (every number is read, none typed).

``python -m CMBDetectorLib.evaluation.validation_doc runs/main docs/`` rewrites the document and the FROC
plot after ``cmbdetector train --export`` has run its ``evaluate`` phase.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"cleanup_tpr": 0.90, "cleanup_fp": 1.0, "candidate_tpr": 0.97}
CLASSIFIERS = (("student", "distilled student (shipped)"),
               ("student_nokd", "same student, no distillation"),
               ("teacher", "teacher"))


def _student_thresholds(op: dict) -> str:
    """``0.85`` or, with one per modality, ``0.75 (GRE), 0.9 (SWI), 0.85 (QSM)``; each
    modality's was chosen within the false-positive budget on its own validation scans."""
    per = op.get("modality_thresholds") or {}
    if not per:
        return f"{op['threshold']}"
    return ", ".join(f"{t} ({m.upper()})" for m, t in sorted(per.items())) + \
        " (one per modality, each chosen within the false-positive budget on that " \
        "modality's validation scans)"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _num(v, nd=2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _ci(ci, pct: bool = False) -> str:
    """`` (lo–hi)`` of a bootstrap interval, or nothing when the evaluation has none."""
    if not ci or any(x is None for x in ci):
        return ""
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}")
    return f" ({f(ci[0])}–{f(ci[1])})"


def _meets_targets(cluster: dict, candidates: dict) -> bool:
    """Cluster TPR and FP per scan after clean-up, and candidate TPR, all within TARGETS."""
    return (cluster["tpr"] is not None and cluster["tpr"] >= TARGETS["cleanup_tpr"]
            and cluster["fp_per_subject"] <= TARGETS["cleanup_fp"]
            and candidates["tpr"] is not None
            and candidates["tpr"] >= TARGETS["candidate_tpr"])


def _group_rows(name: str, g: dict) -> str:
    st = g["stages"]
    cl, v = g["cluster"], g["valdo"]
    ok = _meets_targets(cl, st["candidates"])
    return (f"| {name} | {g['scans']} ({g['cmb_positive_scans']} with CMBs) | {g['truth_cmbs']} | "
            f"{_pct(st['candidates']['tpr'])} / {_num(st['candidates']['fp_per_subject'], 1)} | "
            f"{_pct(st['student']['tpr'])} / {_num(st['student']['fp_per_subject'], 1)} | "
            f"{_pct(cl['tpr'])}{_ci(cl.get('tpr_ci'), True)} / {_num(cl['fp_per_subject'])}"
            f"{_ci(cl.get('fp_per_subject_ci'))} / {_pct(cl['precision'])} | "
            f"{_pct(g['cluster_one_to_one']['tpr'])} | "
            f"{_num(v['f1_median'])} ({_num(v['f1_q1'])}-{_num(v['f1_q3'])}) | "
            f"{_num(v['count_difference_mean'])} | {'yes' if ok else '**no**'} |")


def _strata(title: str, d: dict) -> list:
    if not d:
        return []
    out = [f"| {title} | CMBs | detected after clean-up (cluster rule) |", "|---|---|---|"]
    for k, v in d.items():
        out.append(f"| {k} | {v['n_ref']} | {_pct(v['tpr'])} ({v['detected']}) |")
    return out + [""]


def _rated_rows(name: str, g: dict) -> str:
    """One row of the rating-criterion table (visible footprint >= the criterion)."""
    r = g.get("cluster_rated")
    cand = g.get("stages_rated", {}).get("candidates")
    if not r or not cand:
        return f"| {name} | n/a | n/a | n/a | n/a | n/a |"
    ok = _meets_targets(r, cand)
    return (f"| {name} | {r['n_ref']} ({r['below_criterion']} smaller) | {_pct(cand['tpr'])} | "
            f"{_pct(r['tpr'])}{_ci(r.get('tpr_ci'), True)} | {_num(r['fp_per_subject'])} | "
            f"{'yes' if ok else '**no**'} |")


def _visible_table(g: dict) -> list:
    """Candidates and final detection by visible diameter (footprint in the truth map)."""
    cand = g.get("stages_by_visible_size", {}).get("candidates", {})
    final = g.get("cluster_by_visible_size", {})
    if not final:
        return []
    out = ["| visible diameter | CMBs | candidate stage | after clean-up (cluster rule) |",
           "|---|---|---|---|"]
    for k, v in final.items():
        c = cand.get(k)
        out.append(f"| {k} | {v['n_ref']} | {_pct(c['tpr']) if c else 'n/a'} | "
                   f"{_pct(v['tpr'])} ({v['detected']}) |")
    return out + [""]


def _read_run(run_dir: Path) -> tuple:
    """The run's evaluations, config and operating point, plus the bundled manifest ({} if none)."""
    ev = {k: json.loads((run_dir / "eval" / k / "evaluation.json").read_text())
          for k, _ in CLASSIFIERS}
    cfg = json.loads((run_dir / "config.json").read_text())
    op = json.loads((run_dir / "operating_point.json").read_text())
    manifest_path = Path(__file__).resolve().parents[2] / "Resources" / "Models" / \
        "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return ev, cfg, op, manifest


def _method_lines(cfg: dict, op: dict, manifest: dict) -> list:
    """Title, disclaimer and "How these numbers were produced", filled from the run's files."""
    train = manifest.get("training", {})
    return ["# Validation of the bundled CMBDetector models", "",
            "**Trained and tested on simulated lesions only. Not validated on clinical data. Not "
            "for diagnostic use.** Numbers below measure how well the models find simulated "
            "microbleeds among simulated mimics; real scans have anatomy, vessels, noise and "
            "artefacts the simulator does not reproduce, so expect lower numbers on them.", "",
            "## How these numbers were produced", "",
            f"- Command: `{train.get('command', 'cmbdetector train --run-dir runs/main --export')}`"
            f" (seed {cfg['seed']})"
            + (f" with `OVERRIDES.json` = `{json.dumps(train['overrides'])}`"
               if train.get("overrides") else "")
            + ", then `python -m CMBDetectorLib.evaluation.validation_doc runs/main docs`.",
            f"- Data: simulated subjects (`CMBDetectorLib.simulation.simulator`), split by subject: "
            f"{cfg['n_pool_a']} detector-training subjects, {cfg['n_pool_b']} discriminator "
            f"subjects (of which {cfg['n_val']} chose the operating point"
            + (f", together with {cfg['n_val_extra']} validation subjects simulated for that "
               "alone" if cfg.get("n_val_extra") else "")
            + "), and a **test split of "
            f"{cfg['n_test']} subjects never used in training**, each scanned as SWI, T2*-GRE and "
            "QSM (random field strength, TE, voxel size, orientation, noise, bias; veins, "
            "calcifications, deep-nuclei iron and air/bone artefacts in every subject; the "
            "simulator's natural heavy-tailed CMB count, so CMB-free subjects are included).",
            "- Each test scan went through the shipped `detect()` (same code as "
            "`cmbdetector detect`) with the bundled weights at their operating point "
            f"(candidate threshold {op['candidate_threshold']}, student threshold "
            f"{_student_thresholds(op)}, clean-up minimum volume "
            f"{op.get('min_volume_mm3', 2.0)} mm³ and brain-edge distance "
            f"{op.get('min_edge_distance_mm', 3.0)} mm"
            + ("; each classifier's probability is the mean over the patch's eight mirror "
               "images" if manifest.get("inference", {}).get("mirrored_scoring") else "")
            + "), and was scored by `cmbdetector evaluate`.",
            f"- That operating point was chosen on the {op.get('validation_scans', 'n/a')} "
            "validation scans alone, where it was estimated at "
            f"{_pct(op.get('validation_tpr_estimate'))} TPR with "
            f"{_num(op.get('validation_fp_per_scan_estimate'))} false positives per scan "
            "(candidate centres within 2 mm or overlapping a CMB); the test numbers below are "
            "the independent measurement.",
            "- The training cases record a fingerprint of the simulator and preprocessing code "
            "that made them (`data_version.json`), and training refuses to mix versions: an "
            "earlier model set had been trained on cases simulated before a simulator change "
            "(denser, thicker veins) and tested on scans simulated after it.",
            "- Cluster rule (the paper's): 26-connected components; a true CMB is detected when "
            "any predicted voxel overlaps it; a prediction overlapping no true CMB is a false "
            "positive. The one-to-one column pairs each prediction with at most one true CMB "
            "(Hungarian on overlap). VALDO: centroids within 5 mm, F1 per CMB-positive scan, "
            "median (IQR); |Δcount| over all scans. Stage rows use candidate centroids within "
            "5 mm.",
            "- Brackets after the cluster TPR and FP per scan: 95 % percentile bootstrap "
            "intervals, resampling whole test subjects (their three scans together) 2,000 "
            "times.", ""]


def _results_lines(st: dict) -> list:
    """The test-split table per modality, the size/location strata and the false positives."""
    L = ["## Results on the test split", "",
         "Targets: after clean-up cluster TPR ≥ 90 % with ≤ 1 false positive per scan, and "
         "candidate-stage TPR ≥ 97 %, for each modality.", "",
         "| modality | scans | true CMBs | candidates TPR / FP per scan | after student TPR / FP |"
         " after clean-up TPR / FP per scan / precision | one-to-one TPR | VALDO F1 median (IQR)"
         " | mean abs. count diff. | targets met |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for m, g in sorted(st["by_modality"].items()):
        L.append(_group_rows(m.upper(), g))
    L.append(_group_rows("all", st["overall"]))
    L += ["", "### By lesion size and location (all modalities, distilled student)", ""]
    L += _strata("true diameter", st["overall"].get("cluster_by_size", {}))
    L += _strata("category", st["overall"].get("cluster_by_category", {}))
    if "cluster_rated" in st["overall"]:
        L += _rated_lines(st)
    fpt = st["overall"].get("cluster_fp_types") or st["overall"].get("fp_types") or {}
    if fpt:
        L += ["### What the false positives were (nearest simulated mimic within 3 mm)", "",
              "| source | false positives |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in sorted(fpt.items(), key=lambda kv: -kv[1])] + [""]
    return L


def _rated_lines(st: dict) -> list:
    """The lesions a rater would mark: visible-diameter table and the rating-criterion table."""
    from ..simulation.simulator import SWI_VISIBLE_DROP

    crit = st["overall"]["cluster_rated"]["min_visible_diameter_mm"]
    L = [f"### Lesions a rater would mark: visible diameter ≥ {crit:g} mm", "",
         "The simulator labels every CMB it places, however faint: its label is the "
         "voxels the lesion darkens by at least 40 % on GRE, plus the centre voxel. Raters "
         "mark round dark foci of roughly 2–10 mm on the image (Greenberg et al., Lancet "
         "Neurol 2009). The table below sizes each test CMB by its *visible* diameter, the "
         "equivalent sphere of its labelled footprint, blooming included; on an SWI scan "
         "it is the footprint on the SWI itself (the connected voxels the lesion darkens "
         f"by at least {SWI_VISIBLE_DROP:g} x the brain's median lesion-free SWI, where the "
         "truth files record it), since SWI's phase mask can hide a lesion or widen it:",
         ""]
    L += _visible_table(st["overall"])
    L += [f"Scored on the CMBs of visible diameter ≥ {crit:g} mm only (a smaller one is "
          "neither a miss nor, when found, a false positive; every other false positive "
          "counts as above, so the FP column equals the main table's). This criterion was "
          "applied after the test results were known, so read it as a breakdown of the "
          "main table, not as a replacement:", "",
          "| modality | CMBs scored | candidates TPR | after clean-up TPR (95 % CI) | "
          "FP per scan | targets met |", "|---|---|---|---|---|---|"]
    for m, g in sorted(st["by_modality"].items()):
        L.append(_rated_rows(m.upper(), g))
    return L + [_rated_rows("all", st["overall"]), ""]


def _distillation_lines(ev: dict, cfg: dict, manifest: dict) -> tuple:
    """The classifier comparison table and sentence; also each classifier's FROC curve to plot."""
    L = ["## Knowledge distillation: does it help?", "",
         "The three classifiers score the very same detector candidates of the test split, at "
         "the shipped student's thresholds and the same clean-up; the no-distillation student "
         "has the distilled student's architecture, initialisation, batches and number of "
         "steps.", "",
         "| classifier | parameters | after clean-up TPR / FP per scan (all modalities) | "
         "SWI | GRE | QSM | FROC: mean TPR at 1/8-8 FP per scan |",
         "|---|---|---|---|---|---|---|"]
    params = {"student": manifest.get("models", {}).get("student", {}).get("parameters"),
              "student_nokd": manifest.get("models", {}).get("student", {}).get("parameters"),
              "teacher": manifest.get("teacher", {}).get("parameters")}
    curves = {}
    for key, label in CLASSIFIERS:
        e = ev[key]
        cells = []
        for m in ("swi", "gre", "qsm"):
            g = e["by_modality"].get(m)
            cells.append("n/a" if g is None else
                         f"{_pct(g['cluster']['tpr'])} / {_num(g['cluster']['fp_per_subject'])}")
        fr = e["overall"].get("froc", {}).get("student", {})
        if fr:
            curves[label] = fr
        L.append(f"| {label} | {params.get(key) or 'n/a'} | "
                 f"{_pct(e['overall']['cluster']['tpr'])} / "
                 f"{_num(e['overall']['cluster']['fp_per_subject'])} | {' | '.join(cells)} | "
                 f"{_pct(fr.get('mean_tpr_at_fp'))} |")
    fk = ev["student"]["overall"].get("froc", {}).get("student", {}).get("mean_tpr_at_fp")
    fn = ev["student_nokd"]["overall"].get("froc", {}).get("student", {}).get("mean_tpr_at_fp")
    if fk is not None and fn is not None:
        L += ["", f"Distillation changed the student's FROC-averaged sensitivity by "
              f"{100 * (fk - fn):+.1f} percentage points ({_pct(fn)} → {_pct(fk)}) on this test "
              "split (the paper reports +15 % TPR). During development a teacher trained for "
              "only 800 steps was *worse* than the student alone and distillation from it hurt; "
              f"the shipped teacher had {cfg.get('teacher_steps')} steps, each student "
              f"{cfg.get('disc_steps')}."]
    return L, curves


def _paired_lines(run_dir: Path) -> list:
    """The paired bootstrap comparison of the classifiers, when the run wrote one."""
    paired_path = run_dir / "eval" / "paired_froc.json"
    if not paired_path.exists():
        return []
    paired = json.loads(paired_path.read_text())
    L = ["", "Paired over the same scans (FROC-averaged TPR before clean-up, computed "
         "exactly over every threshold, where the table above samples 400 thresholds; "
         "95 % interval of the difference from 2,000 bootstrap draws of whole test "
         "subjects):", "",
         "| comparison | FROC-averaged TPR | difference (95 % interval) | conclusive |",
         "|---|---|---|---|"]
    names = dict(CLASSIFIERS)
    for key, r in paired.items():
        a, b = key.split("_vs_")
        lo, hi = r["difference_ci"]
        L.append(f"| {names.get(a, a)} vs {names.get(b, b)} | {_pct(r['a'])} vs "
                 f"{_pct(r['b'])} | {100 * r['difference']:+.1f} points "
                 f"({100 * lo:+.1f} to {100 * hi:+.1f}) | "
                 f"{'yes' if lo > 0 or hi < 0 else 'no: the interval contains 0'} |")
    return L


def _froc_lines(curves: dict, docs_dir: Path) -> list:
    """Plot the FROC curves into ``docs_dir/froc.png`` and link them (nothing without curves)."""
    from .metrics import plot_froc

    if not curves:
        return []
    plot_froc(curves, docs_dir / "froc.png", title="Test split, all modalities: FROC over the "
              "confidence threshold (before clean-up)")
    return ["", "![FROC](froc.png)", "",
            "FROC: sensitivity against mean false positives per scan while the confidence "
            "threshold sweeps the stored candidates (centroid within 5 mm; before the "
            "morphological clean-up)."]


def _limits_lines() -> list:
    """The closing section: what the numbers cannot say."""
    return ["", "## Limits, plainly", "",
            "- Trained and tested on simulated lesions and simulated mimics only; no clinical scan "
            "was used anywhere. Real-world sensitivity and false-positive rates are unknown.",
            "- The simulator warps one template brain; real anatomy, pathology (tumours, "
            "haemorrhage, cavernomas, superficial siderosis), motion, flow and vendor-specific "
            "SWI/QSM processing are absent.",
            "- The operating point was chosen on simulated validation subjects; on real data it "
            "will need checking, and the confidence slider is there for that.",
            "- **Not for diagnostic use.**", ""]


def build(run_dir, docs_dir) -> str:
    """Write ``docs_dir/VALIDATION.md`` (and ``froc.png``) from ``run_dir``; returns the text."""
    run_dir, docs_dir = Path(run_dir), Path(docs_dir)
    ev, cfg, op, manifest = _read_run(run_dir)
    L = _method_lines(cfg, op, manifest) + _results_lines(ev["student"])
    distillation, curves = _distillation_lines(ev, cfg, manifest)
    L += distillation + _paired_lines(run_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    L += _froc_lines(curves, docs_dir) + _limits_lines()
    text = "\n".join(L)
    (docs_dir / "VALIDATION.md").write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":  # pragma: no cover
    build(sys.argv[1], sys.argv[2])
