"""docs/VALIDATION.md of a domain run: cross-domain split first, every number from its files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from CMBDetectorLib.evaluation import validation_doc as V
from CMBDetectorLib.evaluation.metrics import size_bin_labels

CLASSIFIERS = ("student", "student_nokd", "teacher")


def _evaluated(tiny_run) -> Path:
    """The tiny (legacy) run, with its evaluate phase done."""
    pytest.importorskip("torch")
    from CMBDetectorLib.training.train import TrainConfig, run_training

    run, models = tiny_run
    if not (run / "eval" / "student" / "evaluation.json").exists():
        run_training(run, TrainConfig.tiny(), models, phases=("evaluate",))
    return run


def _copy_split(src: Path, dst: Path) -> None:
    for k in CLASSIFIERS:
        (dst / k).mkdir(parents=True)
        shutil.copy(src / k / "evaluation.json", dst / k / "evaluation.json")
    if (src / "paired_froc.json").exists():
        shutil.copy(src / "paired_froc.json", dst / "paired_froc.json")


def _domain_run(tiny_run, tmp_path, cross: bool = True) -> Path:
    """A domain run made of the tiny run's files: its config marked as a domain run and its
    test evaluation copied as both splits (the caller makes them differ)."""
    src = _evaluated(tiny_run)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src / "operating_point.json", run / "operating_point.json")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(domains=True, n_cross=7, normalisation="iqr", frst_radii_mm=[1.0, 2.5, 4.0],
               split_candidates=True, intensity_aug_prob=0.3)
    (run / "config.json").write_text(json.dumps(cfg))
    _copy_split(src / "eval", run / "eval")
    if cross:
        _copy_split(src / "eval", run / "eval_cross_domain")
    return run


def _edit(path: Path, change) -> dict:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return d


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next second-level heading."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _subsection(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _row(section: str, name: str) -> str:
    """The headline table's row of ``name`` (the first table of a split section)."""
    return next(ln for ln in section.splitlines() if ln.startswith(f"| {name} | "))


def _large_bin(ev: dict) -> tuple:
    """(lowest visible-size edge at or above the target's, the name of the bin it opens)."""
    edges = ev["settings"]["visible_size_bins_mm"]
    i = next(i for i, e in enumerate(edges) if e >= V.LARGE_MM)
    return edges[i], size_bin_labels(edges)[i + 1]


def _set_gre(ev: dict, tpr: float, fp: float, large_missed: int, big: str) -> None:
    """GRE rater-visible TPR/FP, and 50 large CMBs (in the bin ``big``) of which
    ``large_missed`` were missed."""
    g = ev["by_modality"]["gre"]
    g["cluster_rated"].update(tpr=tpr, fp_per_subject=fp)
    bins = g["cluster_by_visible_size"]
    for name in V._large_bins(ev["settings"])[1]:
        bins.pop(name, None)
    bins[big] = {"n_ref": 50, "detected": 50 - large_missed, "tpr": (50 - large_missed) / 50}


def test_domain_doc_leads_with_the_cross_domain_split(tiny_run, tmp_path):
    run = _domain_run(tiny_run, tmp_path)
    docs = tmp_path / "docs"
    text = V.build(run, docs)
    order = [text.index(h) for h in ("## How these numbers were produced", "## Targets",
                                      "## Cross-domain split", "## In-distribution test split",
                                      "## Knowledge distillation", "## Limits, plainly")]
    assert order == sorted(order)
    kd = _section(text, "## Knowledge distillation")
    assert kd.index("### Cross-domain split") < kd.index("### In-distribution test split")
    assert (docs / "froc.png").exists() and (docs / "froc_cross_domain.png").exists()
    assert "(froc_cross_domain.png)" in _section(text, "## Cross-domain split")
    assert "(froc.png)" in _section(text, "## In-distribution test split")
    method = _section(text, "## How these numbers were produced")
    assert "normalisation `iqr`, FRST radii 1, 2.5, 4 mm" in method
    assert "split into one per focus" in method and "probability 0.3" in method
    assert "**cross-domain split of 7 subjects**" in method and "`robex_ref`" in method
    assert "## Results on the test split" not in text  # the first document's layout
    limits = _section(text, "## Limits, plainly")
    assert "never seen a real annotated CMB" in limits and "motion" in limits
    assert (docs / "VALIDATION.md").read_text(encoding="utf-8") == text


def _mark_in_distribution(d: dict) -> None:
    """Values the tiny run cannot have by chance, to find in the document."""
    d["overall"]["cluster_rated"].update(tpr=0.456, n_ref=33)
    d["overall"]["cluster"]["tpr"] = 0.389
    d["by_modality"]["qsm"]["stages_rated"]["candidates"]["tpr"] = 0.777
    band = next(iter(d["overall"]["cluster_by_visible_size"]))
    d["overall"]["cluster_by_visible_size"][band].update(tpr=0.654, n_ref=26)


def test_each_split_section_shows_its_own_evaluation(tiny_run, tmp_path):
    run = _domain_run(tiny_run, tmp_path)
    cd = run / "eval_cross_domain"
    cross = _edit(cd / "student" / "evaluation.json",
                  lambda d: d["overall"]["cluster_rated"].update(tpr=0.123, n_ref=41))
    ind = _edit(run / "eval" / "student" / "evaluation.json", _mark_in_distribution)
    paired = _edit(cd / "paired_froc.json", lambda d: d["student_vs_student_nokd"].update(
        difference=0.042, difference_ci=[0.011, 0.073]))
    text = V.build(run, tmp_path / "docs")
    sec_cd = _section(text, "## Cross-domain split")
    sec_in = _section(text, "## In-distribution test split")
    row_cd, row_in = _row(sec_cd, "all"), _row(sec_in, "all")
    assert f"| 41 of {cross['overall']['truth_cmbs']} | 12.3 % (" in row_cd
    assert f"| 33 of {ind['overall']['truth_cmbs']} | 45.6 % (" in row_in
    assert row_in.startswith(f"| all | {ind['overall']['scans']} |")
    assert "| 38.9 % |" in row_in and "38.9 %" not in row_cd
    assert "| 77.7 % |" in _row(sec_in, "QSM") and "77.7 %" not in sec_cd
    band = next(iter(ind["overall"]["cluster_by_visible_size"]))
    band_row = _row(_subsection(sec_in, "### By visible size"), band)
    assert band_row.endswith(" / 65.4 % (26) |")
    kd = _section(text, "## Knowledge distillation")
    kd_cd = _subsection(kd, "### Cross-domain split")
    assert "+4.2 points (+1.1 to +7.3) | yes |" in kd_cd
    assert "+4.2 points" not in _subsection(kd, "### In-distribution test split")
    first = paired["student_vs_student_nokd"]
    assert f"from {first['bootstrap']:,} bootstrap draws" in kd_cd


def test_target_verdicts_follow_the_numbers(tiny_run, tmp_path):
    run = _domain_run(tiny_run, tmp_path)
    paths = {s: run / s / "student" / "evaluation.json" for s in ("eval_cross_domain", "eval")}
    edge, big = _large_bin(json.loads(paths["eval"].read_text()))

    def render(tpr, fp, missed):
        for p in paths.values():
            _edit(p, lambda d: _set_gre(d, tpr, fp, missed, big))
        text = V.build(run, tmp_path / "docs")
        return (_row(_section(text, "## Cross-domain split"), "GRE"),
                _row(_section(text, "## In-distribution test split"), "GRE"))

    cd, ind = render(0.92, 0.5, 0)  # meets the cross-domain target, not the in-distribution one
    assert cd.endswith("| 100.0 % (50 of 50) | yes |")
    assert ind.endswith("| **no** (TPR < 95.0 %) |")
    cd, ind = render(0.96, 0.5, 0)
    assert cd.endswith("| yes |") and ind.endswith("| yes |")
    cd, _ = render(0.96, 1.5, 0)
    assert cd.endswith("| **no** (FP per scan > 1) |")
    cd, ind = render(0.96, 0.5, 1)  # one large CMB missed of 50: 98 %
    assert cd.endswith(f"| 98.0 % (49 of 50) | **no** (≥ {edge:g} mm < 99.0 %) |")
    assert ind.endswith(f"(≥ {edge:g} mm < 99.0 %) |")


def test_large_cmb_figure_is_exact_when_the_bins_have_a_4_mm_edge():
    settings = {"visible_size_bins_mm": [2.0, 3.0, 4.0, 6.0]}
    edge, bins = V._large_bins(settings)
    assert edge == V.LARGE_MM and bins == ["4-6 mm", ">=6 mm"]
    g = {"cluster_by_visible_size": {"3-4 mm": {"n_ref": 9, "detected": 0},
                                     "4-6 mm": {"n_ref": 3, "detected": 3},
                                     ">=6 mm": {"n_ref": 1, "detected": 0}}}
    assert V._large(g, bins) == {"n_ref": 4, "detected": 3, "tpr": 0.75}
    assert V._large_note(settings, edge, bins) == []
    edge, bins = V._large_bins({"visible_size_bins_mm": [1.5, 2.0, 3.0, 5.0]})
    assert (edge, bins) == (5.0, [">=5 mm"])
    note = " ".join(V._large_note({"visible_size_bins_mm": [1.5, 2.0, 3.0, 5.0]}, edge, bins))
    assert "no 4 mm edge" in note and "≥ 5 mm band" in note
    assert V._large_bins({"visible_size_bins_mm": [1.5, 2.0]}) == (None, [])


def test_touch_table_per_modality_and_absent_without_the_field():
    def d(n, k):
        return {"n_ref": n, "detected": k, "tpr": k / n}

    st = {"by_modality": {"gre": {"cluster_by_touches": {"none": d(4, 4), "cortex": d(2, 0)}},
                          "qsm": {"cluster_by_touches": {"none": d(4, 3)}}},
          "overall": {"cluster_by_touches": {"none": d(8, 7), "cortex": d(2, 0)}}}
    lines = V._touch_table(st)
    assert "| touches | GRE | QSM | all |" in lines
    assert "| none | 100.0 % (4 of 4) | 75.0 % (3 of 4) | 87.5 % (7 of 8) |" in lines
    assert "| cortex | 0.0 % (0 of 2) | – | 0.0 % (0 of 2) |" in lines
    older = {"by_modality": {"gre": {}}, "overall": {"cluster_by_touches": {"unknown": d(2, 1)}}}
    assert V._touch_table(older) == [] and V._touch_table({"overall": {}}) == []


def test_runs_without_the_cross_domain_split(tiny_run, tmp_path):
    run = _domain_run(tiny_run, tmp_path, cross=False)
    text = V.build(run, tmp_path / "docs")
    assert "## In-distribution test split" in text and "## Cross-domain split" not in text
    assert not (tmp_path / "docs" / "froc_cross_domain.png").exists()
    legacy = V.build(_evaluated(tiny_run), tmp_path / "legacy")  # not a domain run
    assert "## Results on the test split" in legacy and "Cross-domain" not in legacy
    assert "The simulator warps one template brain" in legacy
    assert not (tmp_path / "legacy" / "froc_cross_domain.png").exists()


def test_a_kept_runs_document_names_its_own_bundles_command(tiny_run, tmp_path):
    """A run kept beside the shipped set (docs/experiments/vNN) documents its own manifest's
    command, not the bundled one's."""
    import json

    run = _domain_run(tiny_run, tmp_path)
    manifest = tmp_path / "kept" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"training": {
        "command": "cmbdetector train --run-dir runs/kept --export", "overrides": {}}}))
    text = V.build(run, tmp_path / "docs", manifest)
    assert "`cmbdetector train --run-dir runs/kept --export`" in text
    assert "runs/kept" not in V.build(run, tmp_path / "docs2")


def test_grown_held_out_splits_are_named_in_the_command_line():
    """The manifest keeps the sizes the bundle was exported with; a run whose held-out splits
    grew afterwards says how, and a run that did not says nothing more."""
    manifest = {"training": {"command": "cmbdetector train --export", "overrides": {},
                             "config": {"n_test": 6, "n_cross": 6}}}
    grown = V._command_line({"seed": 1, "n_test": 30, "n_cross": 6}, manifest)
    assert "`\"n_test\": 30`" in grown and "--phases evaluate" in grown
    assert "n_cross" not in grown
    same = V._command_line({"seed": 1, "n_test": 6, "n_cross": 6}, manifest)
    assert "grown" not in same and same.endswith("runs/main docs`.")


def _truth(folder: Path, seed: int, width: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"sub-{seed}_truth.json").write_text(json.dumps(
        {"cmbs": [], "params": {"appearance": {"swi": {"filter": "gaussian",
                                                        "sigma_mm": width}}}}))


def test_the_swi_width_is_read_from_the_runs_own_scans(tiny_run, tmp_path):
    """Runs before 2026-12-05 had one SWI high-pass width in every subject; the document says
    so from their scans, not from today's simulator."""
    run = _domain_run(tiny_run, tmp_path)
    _truth(run / "test_scans", 1, 3.0)
    _truth(run / "cross_domain_scans", 2, 3.0)
    assert V.swi_widths(run) == [3.0]
    method = _section(V.build(run, tmp_path / "docs"), "## How these numbers were produced")
    assert "one high-pass width (3 mm) in every subject" in method
    assert "`swi_filter_width`" not in method
    _truth(run / "cross_domain_scans", 3, 4.25)
    method = _section(V.build(run, tmp_path / "docs"), "## How these numbers were produced")
    assert "one high-pass width" not in method and "`swi_filter_width`" in method


def test_the_detection_line_says_what_happens_on_an_mip():
    assert "`reverse_projection`" in V._projection_clause({})  # the engine's default
    across = V._projection_clause({"inference": {"reverse_projection": False}})
    assert "`shape_across_projection`" in across and "reverse" not in across
    assert V._projection_clause({"inference": {"reverse_projection": False,
                                               "shape_across_projection": False}}) == ""


def test_held_out_scans_from_another_simulator_version_are_declared(tiny_run, tmp_path):
    """A kept bundle measured again on scans from a fixed simulator: the document must say that
    the held-out scans and the training cases come from different code, and which part."""
    run = _domain_run(tiny_run, tmp_path)
    version = {"simulation": "new", "preprocessing": "same"}
    (run / "data_version.json").write_text(json.dumps(version))
    manifest = tmp_path / "kept" / "manifest.json"
    manifest.parent.mkdir()

    def doc(trained):
        manifest.write_text(json.dumps({"training": {
            "command": "cmbdetector train --export", "overrides": {},
            "data_version": trained}}))
        return V.build(run, tmp_path / "docs", manifest)

    changed = doc({"simulation": "old", "preprocessing": "same"})
    assert "another version of `simulation` than" in changed
    assert "simulation new vs old" in changed and "`preprocessing`" not in changed
    assert "another version" not in doc(version)
