"""docs/VALIDATION.md from a training run's evaluation files (every number is read, none typed).

``python -m CMBDetectorLib.evaluation.validation_doc runs/main docs/`` rewrites the document and the FROC
plot after ``cmbdetector train --export`` has run its ``evaluate`` phase.

A run trained on the simulation domains (``config.json``: ``"domains": true``) gets the domain
document: the cross-domain split first (``eval_cross_domain/``: the held-out anatomy and
processing families), then the in-distribution test split (``eval/``), each judged against its
own target. Older runs keep the first document's layout and wording.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

TARGETS = {"cleanup_tpr": 0.90, "cleanup_fp": 1.0, "candidate_tpr": 0.97}
#: Domain runs: after clean-up at the shipped thresholds, per modality, on rater-visible CMBs.
#: The cross-domain target is lower: that split is what the models never saw.
SPLIT_TARGETS = {"eval_cross_domain": {"tpr": 0.90, "fp": 1.0},
                 "eval": {"tpr": 0.95, "fp": 1.0}}
#: ... and on both splits every CMB of at least this visible diameter is found (a large CMB
#: missed is the error a reader forgives least).
LARGE_MM, LARGE_TPR = 4.0, 0.99
CLASSIFIERS = (("student", "distilled student (shipped)"),
               ("student_nokd", "same student, no distillation"),
               ("teacher", "teacher"))


class Split(NamedTuple):
    """One evaluated split of a domain run, as the document presents it."""

    folder: str  # under the run: <folder>/{student,student_nokd,teacher}/evaluation.json
    title: str
    label: str   # in sentences
    froc: str    # plot file under docs/
    n_key: str   # config key of its subject count


#: In the document's order: what the models never saw comes first.
SPLITS = (Split("eval_cross_domain", "Cross-domain split: held-out anatomy and processing",
                "cross-domain split", "froc_cross_domain.png", "n_cross"),
          Split("eval", "In-distribution test split", "in-distribution test split",
                "froc.png", "n_test"))


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


def _stage_cells(name: str, g: dict) -> str:
    """One row of the stage-by-stage table: candidates, student, clean-up, VALDO."""
    st = g["stages"]
    cl, v = g["cluster"], g["valdo"]
    return (f"| {name} | {g['scans']} ({g['cmb_positive_scans']} with CMBs) | {g['truth_cmbs']} | "
            f"{_pct(st['candidates']['tpr'])} / {_num(st['candidates']['fp_per_subject'], 1)} | "
            f"{_pct(st['student']['tpr'])} / {_num(st['student']['fp_per_subject'], 1)} | "
            f"{_pct(cl['tpr'])}{_ci(cl.get('tpr_ci'), True)} / {_num(cl['fp_per_subject'])}"
            f"{_ci(cl.get('fp_per_subject_ci'))} / {_pct(cl['precision'])} | "
            f"{_pct(g['cluster_one_to_one']['tpr'])} | "
            f"{_num(v['f1_median'])} ({_num(v['f1_q1'])}-{_num(v['f1_q3'])}) | "
            f"{_num(v['count_difference_mean'])} |")


def _group_rows(name: str, g: dict) -> str:
    ok = _meets_targets(g["cluster"], g["stages"]["candidates"])
    return _stage_cells(name, g) + f" {'yes' if ok else '**no**'} |"


def _strata(title: str, d: dict) -> list:
    if not d:
        return []
    out = [f"| {title} | CMBs | detected after clean-up (cluster rule) |", "|---|---|---|"]
    for k, v in d.items():
        out.append(f"| {k} | {v['n_ref']} | {_pct(v['tpr'])} ({v['detected']}) |")
    return out + [""]


def _touch_table(st: dict) -> list:
    """Cluster TPR by what each CMB touches (the simulator's ``touches``), per modality: a CMB
    against CSF or a vein is where a dark (GRE/SWI) focus stops being a separate blob."""
    groups = {m.upper(): g.get("cluster_by_touches", {}) for m, g in
              sorted(st.get("by_modality", {}).items())}
    groups["all"] = st.get("overall", {}).get("cluster_by_touches", {})
    kinds = [k for k in ("none", "vein", "cortex", "unknown")
             if any(k in d for d in groups.values())]
    if not kinds or kinds == ["unknown"]:
        return []
    out = ["Detected after clean-up (cluster rule) by what the CMB touches (simulator: `cortex` "
           "= CSF of a sulcus, the surface or a ventricle):", "",
           "| touches | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for k in kinds:
        cells = [f"{_pct(d[k]['tpr'])} ({d[k]['detected']} of {d[k]['n_ref']})" if k in d
                 else "–" for d in groups.values()]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out + [""]


def _swi_processing_table(st: dict) -> list:
    """Visible SWI CMBs found by the scan's phase-mask sign and by whether it is a
    minimum-intensity projection (simulated scans record both): the two settings that decide
    most SWI misses. Empty for a run whose truth lacks them."""
    g = st.get("by_modality", {}).get("swi", {})
    rows = [(title, v) for key, title in (("cluster_rated_by_swi_mask", "phase mask"),
                                         ("cluster_rated_by_swi_mip", "projection"))
            for v in [g.get(key)] if v]
    if not rows:
        return []
    out = ["Visible SWI CMBs found after clean-up, by how the SWI was processed (simulator: "
           "`negative` is the mask that darkens veins and CMBs, as every vendor's SWI does "
           "whatever its phase handedness; `both` darkens either phase sign; `positive` "
           "darkens the sign of diamagnetic sources, an SWI made with the wrong sign that no "
           "scanner makes, on which a CMB looks like a calcification):", "",
           "| SWI processing | found |", "|---|---|"]
    for title, d in rows:
        out += [f"| {title}: {k} | {_pct(v['tpr'])} ({v['detected']} of {v['n_ref']}) |"
                for k, v in d.items()]
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


def _read_split(run_dir: Path, folder: str) -> dict | None:
    """The classifiers' evaluations of one split folder (None when the shipped student's is
    missing: the split was not evaluated)."""
    base = run_dir / folder
    if not (base / "student" / "evaluation.json").exists():
        return None
    return {k: json.loads((base / k / "evaluation.json").read_text())
            for k, _ in CLASSIFIERS if (base / k / "evaluation.json").exists()}


def _read_run(run_dir: Path, manifest_path=None) -> tuple:
    """The run's evaluations, config and operating point, plus the manifest of the bundle it
    exported (default: the bundled one; {} if none)."""
    ev = {k: json.loads((run_dir / "eval" / k / "evaluation.json").read_text())
          for k, _ in CLASSIFIERS}
    cfg = json.loads((run_dir / "config.json").read_text())
    op = json.loads((run_dir / "operating_point.json").read_text())
    manifest_path = Path(manifest_path) if manifest_path else \
        Path(__file__).resolve().parents[2] / "Resources" / "Models" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return ev, cfg, op, manifest


def _title_lines() -> list:
    return ["# Validation of the bundled CMBDetector models", "",
            "**Trained and tested on simulated lesions only. Not validated on clinical data. Not "
            "for diagnostic use.** Numbers below measure how well the models find simulated "
            "microbleeds among simulated mimics; real scans have anatomy, vessels, noise and "
            "artefacts the simulator does not reproduce, so expect lower numbers on them.", "",
            "## How these numbers were produced", ""]


def _command_line(cfg: dict, manifest: dict) -> str:
    train = manifest.get("training", {})
    return (f"- Command: `{train.get('command', 'cmbdetector train --run-dir runs/main --export')}`"
            f" (seed {cfg['seed']})"
            + (f" with `OVERRIDES.json` = `{json.dumps(train['overrides'])}`"
               if train.get("overrides") else "")
            + ", then `python -m CMBDetectorLib.evaluation.validation_doc runs/main docs`."
            + _grown_line(cfg, train.get("config", {})))


def _grown_line(cfg: dict, trained: dict) -> str:
    """When the held-out splits were grown after the export (a resumed run may raise
    ``n_test`` / ``n_cross``), how: the manifest keeps the sizes it was exported with."""
    from ..training.train import EVALUATION_SIZES

    grown = {k: cfg[k] for k in EVALUATION_SIZES
             if k in cfg and k in trained and cfg[k] != trained[k]}
    if not grown:
        return ""
    return (" The held-out splits were grown afterwards (the models unchanged): the same "
            "command with " + ", ".join(f"`\"{k}\": {v}`" for k, v in grown.items())
            + " in `OVERRIDES.json` and `--phases evaluate`.")


def _detect_line(op: dict, manifest: dict, scans: str) -> str:
    """How each scan was detected: the shipped path at the shipped operating point."""
    return (f"- Each {scans} went through the shipped `detect()` (same code as "
            "`cmbdetector detect`) with the bundled weights at their operating point "
            f"(candidate threshold {op['candidate_threshold']}, student threshold "
            f"{_student_thresholds(op)}, clean-up minimum volume "
            f"{op.get('min_volume_mm3', 2.0)} mm³ and brain-edge distance "
            f"{op.get('min_edge_distance_mm', 3.0)} mm"
            + ("; each classifier's probability is the mean over the patch's eight mirror "
               "images" if manifest.get("inference", {}).get("mirrored_scoring") else "")
            + _projection_clause(manifest)
            + "), and was scored by `cmbdetector evaluate`.")


def _projection_clause(manifest: dict) -> str:
    """What detection with this bundle does on a scan whose voxels are a minimum-intensity
    projection: reverse it (``reverse_projection``), measure elongation across it
    (``shape_across_projection``), or nothing."""
    from ..engine.settings import DetectionSettings

    inference = manifest.get("inference", {})

    def on(key):
        return bool(inference.get(key, getattr(DetectionSettings, key)))

    where = "; on a scan whose voxels are a minimum-intensity projection "
    if on("reverse_projection"):
        return (where + "the networks see it reversed, the sliding maximum over the same "
                "slices (`reverse_projection`)")
    if on("shape_across_projection"):
        return (where + "the clean-up measures elongation across the projection axis "
                "(`shape_across_projection`)")
    return ""


def _operating_point_line(op: dict) -> str:
    return (f"- That operating point was chosen on the {op.get('validation_scans', 'n/a')} "
            "validation scans alone, where it was estimated at "
            f"{_pct(op.get('validation_tpr_estimate'))} TPR with "
            f"{_num(op.get('validation_fp_per_scan_estimate'))} false positives per scan "
            "(candidate centres within 2 mm or overlapping a CMB); the test numbers below are "
            "the independent measurement.")


def _method_lines(cfg: dict, op: dict, manifest: dict) -> list:
    """Title, disclaimer and "How these numbers were produced", filled from the run's files."""
    return _title_lines() + [
            _command_line(cfg, manifest),
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
            _detect_line(op, manifest, "test scan"),
            _operating_point_line(op),
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


def _fp_lines(overall: dict, mimic_mm) -> list:
    """Which simulated mimic each false positive lay on (nothing when there were none)."""
    fpt = overall.get("cluster_fp_types") or overall.get("fp_types") or {}
    if not fpt:
        return []
    return ([f"### What the false positives were (nearest simulated mimic within {mimic_mm:g} mm)",
             "", "| source | false positives |", "|---|---|"]
            + [f"| {k} | {v} |" for k, v in sorted(fpt.items(), key=lambda kv: -kv[1])] + [""])


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
    L += _touch_table(st)
    L += _swi_processing_table(st)
    if "cluster_rated" in st["overall"]:
        L += _rated_lines(st)
    return L + _fp_lines(st["overall"], st.get("settings", {}).get("mimic_distance_mm", 3))


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


def _froc_curves(ev: dict) -> dict:
    """Each classifier's FROC curve before clean-up ({} when the evaluation has none)."""
    curves = {}
    for key, label in CLASSIFIERS:
        fr = ev.get(key, {}).get("overall", {}).get("froc", {}).get("student", {})
        if fr:
            curves[label] = fr
    return curves


def _kd_table(ev: dict, manifest: dict, froc_header: str) -> list:
    """One row per classifier: clean-up TPR / FP overall and per modality, FROC average."""
    L = ["| classifier | parameters | after clean-up TPR / FP per scan (all modalities) | "
         f"SWI | GRE | QSM | {froc_header} |",
         "|---|---|---|---|---|---|---|"]
    params = {"student": manifest.get("models", {}).get("student", {}).get("parameters"),
              "student_nokd": manifest.get("models", {}).get("student", {}).get("parameters"),
              "teacher": manifest.get("teacher", {}).get("parameters")}
    for key, label in CLASSIFIERS:
        if key not in ev:
            continue
        e = ev[key]
        cells = []
        for m in ("swi", "gre", "qsm"):
            g = e["by_modality"].get(m)
            cells.append("n/a" if g is None else
                         f"{_pct(g['cluster']['tpr'])} / {_num(g['cluster']['fp_per_subject'])}")
        fr = e["overall"].get("froc", {}).get("student", {})
        L.append(f"| {label} | {params.get(key) or 'n/a'} | "
                 f"{_pct(e['overall']['cluster']['tpr'])} / "
                 f"{_num(e['overall']['cluster']['fp_per_subject'])} | {' | '.join(cells)} | "
                 f"{_pct(fr.get('mean_tpr_at_fp'))} |")
    return L


def _kd_gain(ev: dict) -> tuple:
    """FROC-averaged TPR with and without distillation (None each when not evaluated)."""
    def mean(key):
        return ev.get(key, {}).get("overall", {}).get("froc", {}).get("student", {}) \
            .get("mean_tpr_at_fp")
    return mean("student"), mean("student_nokd")


def _distillation_lines(ev: dict, cfg: dict, manifest: dict) -> tuple:
    """The classifier comparison table and sentence; also each classifier's FROC curve to plot."""
    L = ["## Knowledge distillation: does it help?", "",
         "The three classifiers score the very same detector candidates of the test split, at "
         "the shipped student's thresholds and the same clean-up; the no-distillation student "
         "has the distilled student's architecture, initialisation, batches and number of "
         "steps.", ""]
    L += _kd_table(ev, manifest, "FROC: mean TPR at 1/8-8 FP per scan")
    fk, fn = _kd_gain(ev)
    if fk is not None and fn is not None:
        L += ["", f"Distillation changed the student's FROC-averaged sensitivity by "
              f"{100 * (fk - fn):+.1f} percentage points ({_pct(fn)} → {_pct(fk)}) on this test "
              "split (the paper reports +15 % TPR). During development a teacher trained for "
              "only 800 steps was *worse* than the student alone and distillation from it hurt; "
              f"the shipped teacher had {cfg.get('teacher_steps')} steps, each student "
              f"{cfg.get('disc_steps')}."]
    return L, _froc_curves(ev)


def _paired_rows(paired: dict) -> list:
    """The paired comparisons: both FROC averages, the difference and its interval."""
    L = ["| comparison | FROC-averaged TPR | difference (95 % interval) | conclusive |",
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


def _read_paired(run_dir: Path, folder: str) -> dict:
    path = run_dir / folder / "paired_froc.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _paired_lines(run_dir: Path) -> list:
    """The paired bootstrap comparison of the classifiers, when the run wrote one."""
    paired = _read_paired(run_dir, "eval")
    if not paired:
        return []
    return ["", "Paired over the same scans (FROC-averaged TPR before clean-up, computed "
            "exactly over every threshold, where the table above samples 400 thresholds; "
            "95 % interval of the difference from 2,000 bootstrap draws of whole test "
            "subjects):", ""] + _paired_rows(paired)


def _froc_lines(curves: dict, docs_dir: Path, name: str = "froc.png",
                title: str = "Test split, all modalities: FROC over the confidence threshold "
                             "(before clean-up)", distance_mm=5) -> list:
    """Plot the FROC curves into ``docs_dir/name`` and link them (nothing without curves)."""
    from .metrics import plot_froc

    if not curves:
        return []
    plot_froc(curves, docs_dir / name, title=title)
    return ["", f"![FROC]({name})", "",
            "FROC: sensitivity against mean false positives per scan while the confidence "
            f"threshold sweeps the stored candidates (centroid within {distance_mm:g} mm; before "
            "the morphological clean-up)."]


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


def _legacy_lines(run_dir: Path, docs_dir: Path, ev: dict, cfg: dict, op: dict,
                  manifest: dict) -> list:
    """The first document: one test split, its stage table, distillation, FROC, limits."""
    st = ev["student"]
    L = _method_lines(cfg, op, manifest) + _results_lines(st)
    distillation, curves = _distillation_lines(ev, cfg, manifest)
    L += distillation + _paired_lines(run_dir)
    distance = st.get("settings", {}).get("distance_mm", 5)
    return L + _froc_lines(curves, docs_dir, distance_mm=distance) + _limits_lines()


# ----------------------------------------------------------------------------------------------
# Domain runs: the data, both splits against their targets, distillation per split, limits
# ----------------------------------------------------------------------------------------------
def _names(values) -> str:
    return ", ".join(f"`{v}`" for v in values)


def _n(n, noun: str) -> str:
    """``1 subject``, ``3 subjects``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _level(v) -> str:
    """A confidence level as ``95 %``."""
    return "n/a" if v is None else f"{100 * v:g} %"


def swi_widths(run_dir) -> list:
    """The SWI high-pass widths (mm) the run's test scans record (``<seed>_truth.json`` under
    ``test_scans`` and ``cross_domain_scans``), sorted and distinct."""
    widths = set()
    for folder in ("test_scans", "cross_domain_scans"):
        for path in sorted((Path(run_dir) / folder).glob("*_truth.json")):
            swi = (json.loads(path.read_text()).get("params", {}).get("appearance", {})
                   .get("swi", {}))
            if "sigma_mm" in swi:
                widths.add(round(float(swi["sigma_mm"]), 3))
    return sorted(widths)


def _domain_data_lines(cfg: dict, run_dir=None) -> list:
    """Where the subjects came from: split sizes (config) and the domains (simulation code;
    the SWI width from the run's own scans, since runs before 2026-12-05 never drew it)."""
    from ..simulation import anatomies, appearance, domains

    every = tuple(anatomies.SOURCES)
    trained = domains.allowed("anatomy", "train", every)
    held = domains.HELD_OUT
    kinds = ("gre_weighting", "swi_filter", "qsm_recon")
    drawn = [k for k in appearance.KNOBS if k not in kinds]
    widths = swi_widths(run_dir) if run_dir is not None else []
    fixed_width = ""
    if len(widths) == 1:
        drawn = [k for k in drawn if k != "swi_filter_width"]
        fixed_width = f", with one high-pass width ({widths[0]:g} mm) in every subject"
    prior = {s: domains.LESIONS[s]["cmb_size_prior"] for s in ("train", "test")}
    n_b_train = cfg["n_pool_b"] - cfg["n_val"] + cfg.get("n_pool_b_extra", 0)
    n_val = cfg["n_val"] + cfg.get("n_val_extra", 0)
    lo, hi = cfg.get("pool_n_cmbs", ("n/a", "n/a"))
    return [
        "- Data: simulated subjects (`CMBDetectorLib.simulation`) drawn from the domains of "
        "`simulation/domains.py`, split by subject, each split from its own seed range: "
        f"{cfg['n_pool_a']} detector-training and "
        f"{_n(n_b_train, 'discriminator-training subject')} (`train` domains), "
        f"{_n(n_val, '`validation` subject')} that alone chose the operating point, a **test "
        f"split of {_n(cfg['n_test'], 'subject')}** from the same domains and a "
        f"**cross-domain split of {_n(cfg.get('n_cross', 0), 'subject')}** from the held-out "
        "ones, neither used in training; each subject scanned as SWI, T2*-GRE and QSM.",
        f"- Domains, drawn per subject: the anatomy ({_names(trained)} for training, validation "
        f"and the test split; {_names(held['anatomy'])} held out for the cross-domain split), "
        f"the GRE weighting ({_names(domains.allowed('gre_weighting', 'train'))}; held out: "
        f"{_names(held['gre_weighting'])}), the SWI filter "
        f"({_names(domains.allowed('swi_filter', 'train'))}; held out: "
        f"{_names(held['swi_filter'])}{fixed_width}) and the QSM reconstruction "
        f"({_names(domains.allowed('qsm_recon', 'train'))}; held out: "
        f"{_names(held['qsm_recon'])}); in every split the rest of the appearance is randomised "
        f"({_names(drawn)}), as are field strength, TE, voxel size and orientation.",
        f"- CMBs: sizes from the `{prior['train']}` prior (large CMBs over-represented) for "
        f"training and validation, from the `{prior['test']}` prior for both test splits; "
        f"{lo}–{hi} CMBs per training subject, the simulator's natural heavy-tailed count "
        "(CMB-free subjects included) in the test splits."
        + (f" Simulator overrides for every subject: `{json.dumps(cfg['sim_config'])}`."
           if cfg.get("sim_config") else "")]


def _preparation_line(cfg: dict) -> str:
    """How the cases were prepared (the exported manifest tells ``detect()`` the same)."""
    radii = ", ".join(f"{r:g}" for r in cfg.get("frst_radii_mm", ()))
    return (f"- Preparation: GRE/SWI brain mask threshold on the "
            f"{'log ' if cfg.get('mask_threshold') == 'log' else ''}intensity, "
            f"intensity normalisation `{cfg.get('normalisation')}`, FRST radii "
            f"{radii} mm, merged candidates "
            f"{'split into one per focus' if cfg.get('split_candidates') else 'not split'}; "
            "each training patch got a random monotone intensity change with probability "
            f"{cfg.get('intensity_aug_prob', 0)}.")


def _rules_lines(st: dict, cfg: dict) -> list:
    """The matching rules and the bootstrap, with the evaluation's own settings."""
    s, cl = st.get("settings", {}), st["overall"]["cluster"]
    return [
        f"- Cluster rule (the paper's): {s.get('connectivity')}-connected components; a true "
        "CMB is detected when any predicted voxel overlaps it; a prediction overlapping no true "
        "CMB is a false positive. The one-to-one column pairs each prediction with at most one "
        f"true CMB (Hungarian on overlap). VALDO: centroids within {s.get('distance_mm'):g} mm, "
        "F1 per CMB-positive scan, median (IQR); |Δcount| over all scans. Stage rows use "
        f"candidate centroids within {s.get('distance_mm'):g} mm.",
        f"- Brackets: {_level(cl.get('ci_level'))} percentile bootstrap intervals, resampling "
        f"whole test subjects (their {len(cfg.get('modalities', ()))} scans together) "
        f"{cl.get('ci_bootstrap', 'n/a'):,} times.", ""]


def _domain_method_lines(cfg: dict, op: dict, manifest: dict, st: dict, run_dir=None) -> list:
    """Title, disclaimer and "How these numbers were produced" for a domain run."""
    return (_title_lines() + [_command_line(cfg, manifest)] + _domain_data_lines(cfg, run_dir)
            + [_preparation_line(cfg), _detect_line(op, manifest, "scan of both test splits"),
               _operating_point_line(op),
               "- The training cases record a fingerprint of the simulator and preprocessing "
               "code that made them (`data_version.json`), and training refuses to mix "
               "versions." + _resimulated_clause(run_dir, manifest)]
            + _rules_lines(st, cfg))


def _resimulated_clause(run_dir, manifest: dict) -> str:
    """When the held-out scans were simulated by other code than the training cases (a kept
    bundle measured again after a simulator fix, its models unchanged), which parts differ;
    nothing when they match or either fingerprint is missing."""
    trained = manifest.get("training", {}).get("data_version") or {}
    path = Path(run_dir) / "data_version.json" if run_dir is not None else None
    if not trained or path is None or not path.exists():
        return ""
    tested = json.loads(path.read_text())
    changed = sorted(k for k in tested if trained.get(k) != tested[k])
    if not changed:
        return ""
    return (" **The held-out scans here were simulated by another version of "
            + ", ".join(f"`{k}`" for k in changed)
            + " than the cases these models were trained on** (`data_version` "
            + ", ".join(f"{k} {tested[k]} vs {trained.get(k)}" for k in changed)
            + "): the models were not retrained, only measured again.")


def _targets_lines() -> list:
    t = {k: _pct(v["tpr"]) for k, v in SPLIT_TARGETS.items()}
    return ["## Targets", "",
            "Per modality, after clean-up at the shipped thresholds, on the rater-visible CMBs: "
            f"cross-domain TPR ≥ {t['eval_cross_domain']} with ≤ "
            f"{SPLIT_TARGETS['eval_cross_domain']['fp']:g} false positive per scan; "
            f"in-distribution TPR ≥ {t['eval']} with ≤ {SPLIT_TARGETS['eval']['fp']:g} false "
            f"positive per scan; on both splits every CMB of visible diameter ≥ {LARGE_MM:g} mm "
            f"found (≥ {_pct(LARGE_TPR)}).", ""]


def _large_bins(settings: dict) -> tuple:
    """(lowest edge >= LARGE_MM, names of the visible-size bins at or above it); (None, [])
    when the evaluation's bins reach no such edge."""
    from .metrics import size_bin_labels

    edges = [float(e) for e in settings.get("visible_size_bins_mm", ())]
    names = size_bin_labels(edges) if edges else []
    above = [(e, names[i + 1]) for i, e in enumerate(edges) if e >= LARGE_MM]
    if not above:
        return None, []
    return above[0][0], [n for _, n in above]


def _large(g: dict, bins: list) -> dict | None:
    """CMBs of the large bins found after clean-up (None without them in the evaluation)."""
    d = g.get("cluster_by_visible_size", {})
    if not bins or not d:
        return None
    n = sum(d[b]["n_ref"] for b in bins if b in d)
    hit = sum(d[b]["detected"] for b in bins if b in d)
    return {"n_ref": n, "detected": hit, "tpr": hit / n if n else None}


def _verdict(g: dict, target: dict, large: dict | None, edge) -> str:
    """``yes`` or ``**no** (what failed)`` for one modality; n/a without rater-visible CMBs."""
    r = g.get("cluster_rated")
    if not r or r.get("tpr") is None:
        return "n/a"
    fails = []
    if r["tpr"] < target["tpr"]:
        fails.append(f"TPR < {_pct(target['tpr'])}")
    if r["fp_per_subject"] > target["fp"]:
        fails.append(f"FP per scan > {target['fp']:g}")
    if large and large["tpr"] is not None and large["tpr"] < LARGE_TPR:
        fails.append(f"≥ {edge:g} mm < {_pct(LARGE_TPR)}")
    return "yes" if not fails else f"**no** ({'; '.join(fails)})"


def _headline_row(name: str, g: dict, target: dict, bins: list, edge) -> str:
    r = g.get("cluster_rated") or {}
    cand = g.get("stages_rated", {}).get("candidates", {})
    large = _large(g, bins)
    big = "n/a" if large is None else (
        "none" if not large["n_ref"] else
        f"{_pct(large['tpr'])} ({large['detected']} of {large['n_ref']})")
    return (f"| {name} | {g['scans']} | {r.get('n_ref', 'n/a')} of {g['truth_cmbs']} | "
            f"{_pct(r.get('tpr'))}{_ci(r.get('tpr_ci'), True)} / "
            f"{_num(r.get('fp_per_subject'))} | {_pct(g['cluster']['tpr'])} | "
            f"{_pct(cand.get('tpr'))} | {big} | {_verdict(g, target, large, edge)} |")


def _headline_lines(st: dict, split: Split) -> list:
    """The compact table per modality and all: the split's target, met or not."""
    from ..simulation.simulator import SWI_VISIBLE_DROP

    settings = st.get("settings", {})
    crit = settings.get("rated_diameter_mm")
    edge, bins = _large_bins(settings)
    target = SPLIT_TARGETS[split.folder]
    big = f"≥ {edge:g} mm visible found" if edge is not None else f"≥ {LARGE_MM:g} mm found"
    groups = sorted(st["by_modality"].items()) + [("all", st["overall"])]
    L = [f"| modality | scans | CMBs ≥ {crit:g} mm visible, of all | after clean-up TPR (95 % "
         "CI) / FP per scan, visible | TPR, all CMBs | candidate-stage TPR, visible | "
         f"{big} | target met |", "|---|---|---|---|---|---|---|---|"]
    L += [_headline_row(m.upper() if m != "all" else m, g, target, bins, edge)
          for m, g in groups]
    L += ["", f"Visible: the equivalent-sphere diameter of the CMB's labelled footprint, "
          f"blooming included; on SWI its footprint on the SWI itself (darkened by at least "
          f"{SWI_VISIBLE_DROP:g} x the median lesion-free SWI). A CMB under {crit:g} mm "
          "visible is neither a miss nor, when found, a false positive; every other false "
          "positive counts."]
    return L + _large_note(settings, edge, bins) + [""]


def _large_note(settings: dict, edge, bins: list) -> list:
    """Say so when the large-CMB figure is not exactly the target's ≥ LARGE_MM."""
    if edge == LARGE_MM:
        return []
    edges = ", ".join(f"{e:g}" for e in settings.get("visible_size_bins_mm", ()))
    named = f" ({', '.join(bins)})" if len(bins) > 1 else ""
    shown = (f"the ≥ {edge:g} mm band{named} is shown and judged instead, and "
             f"CMBs of {LARGE_MM:g}–{edge:g} mm are inside the band below it"
             if edge is not None else "no large-CMB figure can be shown")
    return ["", f"The target asks for every CMB ≥ {LARGE_MM:g} mm visible. The evaluation's "
            f"visible-size bins (edges {edges} mm) have no {LARGE_MM:g} mm edge and "
            "evaluation.json keeps no per-CMB visible diameter, so " + shown + "."]


def _band_lines(st: dict) -> list:
    """Candidate stage and after clean-up per visible-size band, per modality and all."""
    bands = list(st["overall"].get("cluster_by_visible_size", {}))
    if not bands:
        return []
    groups = sorted(st["by_modality"].items()) + [("all", st["overall"])]
    L = ["### By visible size", "",
         "Each cell: candidate-stage TPR / after clean-up TPR (CMBs in the band).", "",
         "| visible diameter | " + " | ".join(m.upper() if m != "all" else m
                                           for m, _ in groups) + " |",
         "|---|" + "---|" * len(groups)]
    for b in bands:
        L.append(f"| {b} | " + " | ".join(_band_cell(g, b) for _, g in groups) + " |")
    return L + [""]


def _band_cell(g: dict, band: str) -> str:
    final = g.get("cluster_by_visible_size", {}).get(band)
    if not final:
        return "–"
    cand = g.get("stages_by_visible_size", {}).get("candidates", {}).get(band) or {}
    return f"{_pct(cand.get('tpr'))} / {_pct(final['tpr'])} ({final['n_ref']})"


def _stage_lines(st: dict) -> list:
    """Every CMB, stage by stage: candidates, student, clean-up, one-to-one, VALDO."""
    L = ["### Stage by stage, all CMBs", "",
         "| modality | scans | true CMBs | candidates TPR / FP per scan | after student TPR / FP |"
         " after clean-up TPR / FP per scan / precision | one-to-one TPR | VALDO F1 median (IQR)"
         " | mean abs. count diff. |",
         "|---|---|---|---|---|---|---|---|---|"]
    L += [_stage_cells(m.upper(), g) for m, g in sorted(st["by_modality"].items())]
    L += [_stage_cells("all", st["overall"]), ""]
    strata = (_strata("true diameter", st["overall"].get("cluster_by_size", {}))
              + _strata("category", st["overall"].get("cluster_by_category", {}))
              + _touch_table(st) + _swi_processing_table(st))
    if strata:
        L += ["### By true diameter and location (all modalities)", ""] + strata
    return L


def _split_intro(split: Split, cfg: dict) -> str:
    from ..simulation import domains

    prior = domains.LESIONS["cross_domain" if split.folder != "eval" else "test"]
    if split.folder == "eval":
        where = "drawn from the training domains (anatomies and processing families)"
    else:
        held = domains.HELD_OUT
        where = (f"all on the held-out anatomy {_names(held['anatomy'])}, each modality with its "
                 f"held-out family (GRE weighting {_names(held['gre_weighting'])}, SWI filter "
                 f"{_names(held['swi_filter'])}, QSM reconstruction {_names(held['qsm_recon'])})")
    return (f"{_n(cfg.get(split.n_key, 'n/a'), 'subject')} never used in training, {where}; "
            f"CMB sizes from the `{prior['cmb_size_prior']}` prior.")


def _split_lines(split: Split, ev: dict, cfg: dict, docs_dir: Path) -> list:
    """One split's section: headline, size bands, stages, false positives, FROC."""
    st = ev["student"]
    s = st.get("settings", {})
    title = (f"{split.label[0].upper()}{split.label[1:]}, all modalities: FROC over the "
             "confidence threshold (before clean-up)")
    return ([f"## {split.title}", "", _split_intro(split, cfg), ""]
            + _headline_lines(st, split) + _band_lines(st) + _stage_lines(st)
            + _fp_lines(st["overall"], s.get("mimic_distance_mm", 3))
            + _froc_lines(_froc_curves(ev), docs_dir, split.froc, title,
                          s.get("distance_mm", 5)) + [""])


def _kd_split_lines(split: Split, ev: dict, paired: dict, manifest: dict) -> list:
    """Distillation on one split: the classifier table, the gain, the paired comparison."""
    fr = ev["student"]["overall"].get("froc", {}).get("student", {})
    limits = [float(k) for k in fr.get("tpr_at_fp", {})]
    span = f"{min(limits):g}-{max(limits):g}" if limits else "n/a"
    L = [f"### {split.title}", ""] + _kd_table(ev, manifest,
                                             f"FROC: mean TPR at {span} FP per scan")
    fk, fn = _kd_gain(ev)
    if fk is not None and fn is not None:
        L += ["", f"Distillation changed the student's FROC-averaged sensitivity by "
              f"{100 * (fk - fn):+.1f} percentage points ({_pct(fn)} → {_pct(fk)}) on the "
              f"{split.label}."]
    if paired:
        first = next(iter(paired.values()))
        L += ["", "Paired over the same scans (FROC-averaged TPR before clean-up, computed "
              f"exactly over every threshold, where the table above samples "
              f"{len(fr.get('threshold', ()))} thresholds; {_level(first.get('ci_level'))} "
              f"interval of the difference from {first.get('bootstrap', 'n/a'):,} bootstrap "
              "draws of whole test subjects):", ""] + _paired_rows(paired)
    return L + [""]


def _kd_lines(run_dir: Path, present: list, cfg: dict, manifest: dict) -> list:
    """The distillation section, cross-domain split first."""
    L = ["## Knowledge distillation: does it help?", "",
         "On each split the three classifiers score the very same detector candidates, at the "
         "shipped student's thresholds and the same clean-up; the no-distillation student has "
         "the distilled student's architecture, initialisation, batches and number of steps "
         f"(the teacher had {cfg.get('teacher_steps')} steps, each student "
         f"{cfg.get('disc_steps')}).", ""]
    for split, ev in present:
        L += _kd_split_lines(split, ev, _read_paired(run_dir, split.folder), manifest)
    return L


def _anatomy_lines() -> list:
    from ..simulation import anatomies

    return [f"  - `{n}`: {s.what}" for n, s in anatomies.SOURCES.items()]


def _domain_limits_lines() -> list:
    """What the domain data simulates now and what it still does not (docs/simulation.md)."""
    from ..simulation import anatomies, appearance

    near = [n for n, s in anatomies.SOURCES.items() if s.near_mni]
    return (["## Limits, plainly", "",
            "- Trained and tested on simulated lesions and simulated mimics only; no clinical "
            "scan was used anywhere, and **the models have never seen a real annotated CMB**. "
            "Real-world sensitivity and false-positive rates are unknown.",
            f"- Simulated now: MNI152 and {len(anatomies.SOURCES)} other anatomies, of which "
            f"{_names(near)} are means of many brains normalised to MNI space:"]
            + _anatomy_lines() + [
            "- Per subject randomised GRE weighting "
            f"({_names(appearance.GRE_WEIGHTINGS)}), SWI filters "
            f"({_names(appearance.SWI_FILTERS)}) and phase masks "
            f"({_names(appearance.SWI_MASKS)}), QSM reconstruction families "
            f"({_names(appearance.QSM_RECONS)}), noise with a g-factor map, bias, texture, "
            "Gibbs ringing and ghosting; CMB sizes from a size prior fitted to real datasets "
            "(large CMBs over-represented in training), irregular shapes, clusters and CMBs "
            "touching veins or the cortex.",
            "- The anatomies are templates, one mean head and single subjects registered to "
            "MNI152 and segmented there (deep nuclei and sinuses are MNI's, warped), not a "
            "population; the cross-domain split is one held-out brain.",
            "- Still not simulated (docs/simulation.md): real pathology (tumours, haemorrhage, "
            "cavernomas, superficial siderosis), motion beyond ghost-like replicas, flow voids, "
            "multi-echo, vendor-specific SWI/QSM pipelines beyond the simulated families, a "
            "haemosiderin rim or susceptibility gradient inside a CMB; veins and the other "
            "mimics keep their own sizes. No real clinical scan with CMBs was used for "
            "training, for choosing the operating point, or for testing.",
            "- The operating point was chosen on simulated validation subjects; on real data it "
            "will need checking, and the confidence slider is there for that.",
            "- **Not for diagnostic use.**", ""])


def _domain_lines(run_dir: Path, docs_dir: Path, ev: dict, cfg: dict, op: dict,
                  manifest: dict) -> list:
    """The domain document: method, each split (cross-domain first), distillation, limits."""
    present = [(s, e) for s in SPLITS
               for e in [ev if s.folder == "eval" else _read_split(run_dir, s.folder)]
               if e is not None]
    L = _domain_method_lines(cfg, op, manifest, ev["student"], run_dir) + _targets_lines()
    for split, e in present:
        L += _split_lines(split, e, cfg, docs_dir)
    return L + _kd_lines(run_dir, present, cfg, manifest) + _domain_limits_lines()


def build(run_dir, docs_dir, manifest_path=None) -> str:
    """Write ``docs_dir/VALIDATION.md`` (and the FROC plots) from ``run_dir``; returns the text.
    ``manifest_path``: the manifest of the bundle the run exported, when it is not the
    bundled one (a run kept beside the shipped set)."""
    run_dir, docs_dir = Path(run_dir), Path(docs_dir)
    ev, cfg, op, manifest = _read_run(run_dir, manifest_path)
    docs_dir.mkdir(parents=True, exist_ok=True)
    lines = _domain_lines if cfg.get("domains") else _legacy_lines
    text = "\n".join(lines(run_dir, docs_dir, ev, cfg, op, manifest))
    (docs_dir / "VALIDATION.md").write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":  # pragma: no cover
    build(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
