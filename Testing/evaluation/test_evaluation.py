"""``cmbdetector evaluate`` on tiny synthetic files whose scores are known by hand."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from CMBDetectorLib.evaluation import evaluate as E
from CMBDetectorLib.cli.main import main
from CMBDetectorLib.engine.results import Candidate, DetectionResult
from CMBDetectorLib.engine.volume import Volume, write_volume

SHAPE = (16, 24, 24)  # [k, j, i]
GRID = Volume.from_arrays(np.zeros(SHAPE, np.uint8), spacing=(1.0, 1.0, 1.5),
                          origin=(-10.0, 5.0, -20.0))


def ras(i, j, k):
    return [float(x) for x in GRID.ijk_to_ras_points([[i, j, k]])[0]]


def cube(arr, ijk, r, value):
    i, j, k = ijk
    arr[k - r:k + r + 1, j - r:j + r + 1, i - r:i + r + 1] = value


def make_result(cands, modality="swi", threshold=0.5):
    """A DetectionResult whose candidate label map has a 1-voxel blob at each centroid."""
    labels = np.zeros(SHAPE, np.int32)
    objs = []
    for n, (ijk, conf, kept) in enumerate(cands, start=1):
        cube(labels, ijk, 0, n)
        objs.append(Candidate(n, tuple(ras(*ijk)), tuple(map(float, ijk)), 1.5, 0.9, conf, kept,
                              "" if kept else "elongated"))
    return DetectionResult(modality, GRID.ijk_to_ras.copy(), SHAPE, objs, labels, threshold)


# sub-001: CMB 1 (diameter 2 mm, lobar) found; CMB 2 (4 mm, deep) only a low-confidence
# candidate; a confident FP on a vein; an even more confident candidate removed by clean-up.
CMB1, CMB2, VEIN, STRAY = (5, 5, 5), (15, 15, 10), (5, 18, 12), (18, 3, 3)
SUB1 = [(CMB1, 0.9, True), (CMB2, 0.3, True), (VEIN, 0.8, True), (STRAY, 0.95, False)]
# sub-002: no CMB; one low-confidence candidate
SUB2 = [((10, 10, 10), 0.4, True)]


def truth_files(folder, stem, cmbs, mimics=()):
    lab = np.zeros(SHAPE, np.uint16)
    items = []
    for n, (ijk, radius, cat) in enumerate(cmbs, start=1):
        cube(lab, ijk, 1, n)
        items.append({"id": n, "centre_ras": ras(*ijk), "radius_mm": radius, "chi_ppm": 0.5,
                      "category": cat, "region": "x"})
    write_volume(GRID.with_array(lab), folder / f"{stem}_cmb.nii.gz")
    truth = {"cmbs": items, "mimics": [{"id": n, "type": t, "centre_ras": ras(*ijk)}
                                       for n, (ijk, t) in enumerate(mimics, start=1)]}
    (folder / f"{stem}_truth.json").write_text(json.dumps(truth))
    return truth, GRID.with_array(lab)


def pred_files(folder, stem, result):
    write_volume(GRID.with_array(result.label_map()), folder / f"{stem}_cmb.nii.gz")
    (folder / f"{stem}_detection.json").write_text(json.dumps(result.summary()))


@pytest.fixture()
def dataset(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    t1 = truth_files(truth, "sub-001", [(CMB1, 1.0, "lobar"), (CMB2, 2.0, "deep")],
                     [(VEIN, "vein")])
    t2 = truth_files(truth, "sub-002", [])
    r1, r2 = make_result(SUB1), make_result(SUB2)
    pred_files(pred, "sub-001_swi", r1)
    pred_files(pred, "sub-002_swi", r2)
    return {"pred": pred, "truth": truth, "t": [t1, t2], "r": [r1, r2], "tmp": tmp_path}


def check_expected(res):
    o = res["overall"]
    assert (o["scans"], o["cmb_positive_scans"], o["truth_cmbs"]) == (2, 1, 2)
    c = o["cluster"]
    assert (c["tp"], c["fn"], c["fp"]) == (1, 1, 1)
    assert c["tpr"] == 0.5 and c["precision"] == 0.5 and c["fp_per_subject"] == 0.5
    assert o["cluster_fp_types"] == {"vein": 1}
    v = o["valdo"]
    assert v["cmb_positive_subjects"] == 1 and v["f1_median"] == pytest.approx(0.5)
    assert v["count_difference_mean"] == 0.0
    st = o["stages"]
    assert (st["candidates"]["tpr"], st["candidates"]["fp_per_subject"]) == (1.0, 1.5)
    assert (st["student"]["tpr"], st["student"]["fp_per_subject"]) == (0.5, 1.0)
    assert (st["cleanup"]["tpr"], st["cleanup"]["fp_per_subject"]) == (0.5, 0.5)
    size = o["stages_by_size"]
    assert size["candidates"]["<3 mm"]["detected"] == 1
    assert size["cleanup"]["<3 mm"]["tpr"] == 1.0 and size["cleanup"]["3-5 mm"]["tpr"] == 0.0
    assert o["cluster_by_size"]["3-5 mm"]["detected"] == 0
    assert o["stages_by_category"]["cleanup"]["lobar"]["tpr"] == 1.0
    assert o["fp_types"] == {"vein": 1}
    fr = o["froc"]["cleanup"]
    # threshold 0, kept only: vein FP + sub-002 candidate (the unkept stray is excluded)
    assert fr["tpr"][0] == 1.0 and fr["fp_per_subject"][0] == 1.0
    assert o["froc"]["student"]["fp_per_subject"][0] == 1.5
    cases = {c["name"]: c for c in res["cases"]}
    assert math.isnan(cases["sub-002_swi"]["valdo"]["f1"] or math.nan)
    assert set(res["by_modality"]) == {"swi"}


def test_in_memory_evaluate_subjects(dataset):
    (t1, l1), (t2, l2) = dataset["t"]
    r1, r2 = dataset["r"]
    cases = [E.case_from_result("sub-001_swi", r1, t1, l1),
             E.case_from_result("sub-002_swi", r2, t2, l2)]
    res = E.evaluate_subjects(cases)
    check_expected(res)
    json.dumps(res, allow_nan=False)  # JSON-ready (NaN -> None)
    text = E.format_report(res)
    assert "any overlap (paper)" in text and "| cleanup | 50.0 %" in text


def test_sensitivity_by_what_the_cmb_touches(dataset):
    """The simulator's ``touches`` stratifies the cluster TPR and each stage (a CMB against
    CSF is what GRE/SWI miss); truth without it reads ``unknown``."""
    (t1, l1), (t2, l2) = dataset["t"]
    r1, r2 = dataset["r"]
    t1 = json.loads(json.dumps(t1))
    t1["cmbs"][0]["touches"], t1["cmbs"][1]["touches"] = "none", "cortex"
    res = E.evaluate_subjects([E.case_from_result("sub-001_swi", r1, t1, l1),
                               E.case_from_result("sub-002_swi", r2, t2, l2)])
    o = res["overall"]
    assert o["cluster_by_touches"] == {"none": {"n_ref": 1, "detected": 1, "tpr": 1.0},
                                       "cortex": {"n_ref": 1, "detected": 0, "tpr": 0.0}}
    assert o["stages_by_touches"]["candidates"]["cortex"]["detected"] == 1  # a candidate only
    assert o["stages_by_touches"]["student"]["cortex"]["detected"] == 0
    assert "TPR by what the CMB touches" in E.format_report(res)
    (t1, l1), _ = dataset["t"]  # as the simulator wrote it before ``touches``
    plain = E.evaluate_subjects([E.case_from_result("sub-001_swi", r1, t1, l1)])
    assert set(plain["overall"]["cluster_by_touches"]) == {"unknown"}
    assert "TPR by what the CMB touches" not in E.format_report(plain)


def test_visible_swi_cmbs_by_phase_mask_and_projection(dataset):
    """Simulated SWI truth records its phase-mask sign and mIP; the visible CMBs found are
    counted by each (the two settings behind most SWI misses), and VALIDATION.md shows them."""
    from CMBDetectorLib.evaluation.validation_doc import _swi_processing_table

    (t1, l1), (t2, l2) = dataset["t"]
    r1, r2 = dataset["r"]
    t1 = json.loads(json.dumps(t1))
    for c in t1["cmbs"]:
        c["swi_visible_diameter_mm"] = 3.0  # both rated; CMB1 is found, CMB2 missed
    t1["params"] = {"appearance": {"swi": {"mask": "positive", "power": 6, "mip": 3}}}
    res = E.evaluate_subjects([E.case_from_result("sub-001_swi", r1, t1, l1),
                               E.case_from_result("sub-002_swi", r2, t2, l2)])
    g = res["by_modality"]["swi"]
    assert g["cluster_rated_by_swi_mask"] == {"positive": {"n_ref": 2, "detected": 1, "tpr": 0.5}}
    assert g["cluster_rated_by_swi_mip"] == {"mIP of 3 slices": {"n_ref": 2, "detected": 1,
                                                                 "tpr": 0.5}}
    json.dumps(res, allow_nan=False)
    table = "\n".join(_swi_processing_table(res))
    assert "| phase mask: positive | 50.0 % (1 of 2) |" in table
    assert "| projection: mIP of 3 slices | 50.0 % (1 of 2) |" in table
    r1.modality = "gre"  # the same truth on a GRE scan: no SWI processing to count
    gre = E.evaluate_subjects([E.case_from_result("sub-001_gre", r1, t1, l1)])
    assert "cluster_rated_by_swi_mask" not in gre["overall"]
    (t1, l1), _ = dataset["t"]  # no params (a user's own truth): nothing counted, no table
    r1.modality = "swi"
    plain = E.evaluate_subjects([E.case_from_result("sub-001_swi", r1, t1, l1)])
    assert "cluster_rated_by_swi_mask" not in plain["by_modality"]["swi"]
    assert _swi_processing_table(plain) == []


def test_cli_round_trip(dataset, capsys):
    out = dataset["tmp"] / "report"
    code = main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out)])
    assert code == 0
    res = json.loads((out / "evaluation.json").read_text())
    check_expected(res)
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "VALDO" in md and "TPR by true diameter" in md
    assert "Cluster-wise" in capsys.readouterr().out


def test_cli_higher_threshold_relabels_map(dataset):
    out = dataset["tmp"] / "t085"
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out),
                 "--threshold", "0.85", "-q", "--no-plot"]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    c = res["overall"]["cluster"]
    assert (c["tp"], c["fp"]) == (1, 0)  # the 0.8 vein lesion is dropped from the label map
    assert res["overall"]["stages"]["cleanup"]["fp"] == 0
    assert not (out / "froc.png").exists()
    # lowering below the written threshold cannot be done on a label map
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out),
                 "--threshold", "0.2", "-q"]) == 1
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out),
                 "--threshold", "0.2", "-q", "--no-label-maps"]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]
    (tmp_path / "p").mkdir()
    assert main(["evaluate", str(tmp_path / "p"), str(tmp_path), "-q"]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err


def test_pairing_rule():
    pairs = E.pair_stems(["sub-1_swi", "sub-10_swi", "sub-10", "sub-2_gre", "other"],
                         ["sub-1", "sub-10", "sub-2"])
    assert pairs == {"sub-1_swi": "sub-1", "sub-10_swi": "sub-10", "sub-10": "sub-10",
                     "sub-2_gre": "sub-2"}
    # longest truth stem wins
    assert E.pair_stems(["a_b_swi"], ["a", "a_b"]) == {"a_b_swi": "a_b"}


def test_manifest_lesion_csv_and_missing(dataset):
    truth = dataset["truth"]
    other = dataset["tmp"] / "pred2"
    other.mkdir()
    # point-only prediction: lesion CSV (no JSON, no label map), modality from the manifest
    (other / "scanA_lesions.csv").write_text(
        "id,label,R,A,S\n1,CMB-1,{},{},{}\n".format(*ras(*CMB2)))
    man = dataset["tmp"] / "m.csv"
    man.write_text("prediction,truth,modality\nscanA,sub-001,qsm\n")
    cases, unpaired = E.load_cases(other, truth, manifest=man)
    assert len(cases) == 1 and cases[0].modality == "qsm" and unpaired["unpaired_truths"] == [
        "sub-002"]
    res = E.evaluate_subjects(cases)
    assert "cluster" not in res["overall"]  # no label map: point family only
    assert res["overall"]["stages"]["cleanup"]["tp"] == 1
    assert res["overall"]["valdo"]["sources"] == ["centroid lists"]
    cases, _ = E.load_cases(other, truth, manifest=man, missing_as_empty=True)
    res = E.evaluate_subjects(cases)
    assert res["by_modality"]["missing"]["valdo"]["count_difference_mean"] == 0.0
    assert res["overall"]["scans"] == 2


def test_prediction_on_other_grid_is_resampled(dataset):
    (t1, l1), _ = dataset["t"]
    # prediction written on a 0.5 mm grid covering the same space: CMB1 hit only
    fine = Volume.from_arrays(np.zeros((32, 48, 48), np.uint16), spacing=(0.5, 0.5, 0.75),
                              origin=GRID.origin - np.array([0.25, 0.25, 0.375]))
    arr = np.zeros(fine.array.shape, np.uint16)
    i, j, k = np.round(fine.ras_to_ijk_points([ras(*CMB1)])[0]).astype(int)
    arr[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 1
    case = E.EvalCase("x", "swi", t1, l1, fine.with_array(arr), None, 0.5)
    res = E.evaluate_subjects([case])
    c = res["overall"]["cluster"]
    assert (c["tp"], c["fn"], c["fp"]) == (1, 1, 0)
    assert "resampled" in res["cases"][0]["notes"][0]


def test_scan_without_candidates_still_counts_in_froc(dataset):
    (t1, l1), _ = dataset["t"]
    r1 = dataset["r"][0]
    nothing = make_result([])
    res = E.evaluate_subjects([E.case_from_result("a", r1, t1, l1),
                               E.case_from_result("b", nothing, t1, l1)])
    o = res["overall"]
    assert o["stages"]["candidates"]["tpr"] == 0.5  # 2 of 4 CMBs: scan b found none
    assert max(o["froc"]["student"]["tpr"]) == 0.5
    assert res["cases"][1]["valdo"]["f1"] == 0.0


def test_compare_classifiers_refuses_scans_the_other_classifier_lacks():
    from types import SimpleNamespace

    from CMBDetectorLib.errors import InputError
    from CMBDetectorLib.evaluation.evaluate import compare_classifiers

    a = [SimpleNamespace(name="sub-1_swi"), SimpleNamespace(name="sub-2_swi")]
    with pytest.raises(InputError, match="sub-2_swi"):
        compare_classifiers(a, a[:1])


def test_classifier_comparison_needs_no_label_maps(dataset):
    cases, _ = E.load_cases(dataset["pred"], dataset["truth"])
    light = [E.without_label_maps(c) for c in cases]
    assert all(c.pred_labels is None and c.truth_labels is None for c in light)
    assert cases[0].pred_labels is not None  # the originals keep theirs
    full = E.compare_classifiers(cases, cases, n_boot=50)
    assert E.compare_classifiers(light, light, n_boot=50) == full
    no_json = E.EvalCase("x", truth=None, truth_labels=cases[0].truth_labels)
    with pytest.raises(E.InputError, match="label map is the truth"):
        E.without_label_maps(no_json)


def test_rating_criterion_scores_small_visible_lesions_apart():
    # CMB 1: a 3x3x3 footprint (40.5 mm^3, visible diameter 4.3 mm), missed;
    # CMB 2: one voxel (1.5 mm^3, visible 1.4 mm), found; plus one FP far from both.
    lab = np.zeros(SHAPE, np.uint16)
    cube(lab, CMB2, 1, 1)
    cube(lab, CMB1, 0, 2)
    truth = {"cmbs": [{"id": 1, "centre_ras": ras(*CMB2), "radius_mm": 2.0, "category": "deep"},
                      {"id": 2, "centre_ras": ras(*CMB1), "radius_mm": 0.6,
                       "category": "lobar"}], "mimics": []}
    result = make_result([(CMB1, 0.9, True), (STRAY, 0.9, True)])
    case = E.case_from_result("s_swi", result, truth, GRID.with_array(lab))
    o = E.evaluate_subjects([case])["overall"]
    assert (o["cluster"]["tp"], o["cluster"]["fn"], o["cluster"]["fp"]) == (1, 1, 1)
    r = o["cluster_rated"]
    # the small CMB is neither a miss nor, found, a false positive; the FP stays
    assert (r["n_ref"], r["tp"], r["fn"], r["fp"], r["n_pred"]) == (1, 0, 1, 1, 1)
    assert r["below_criterion"] == 1 and r["min_visible_diameter_mm"] == 2.0
    assert o["cluster_by_visible_size"]["<1.5 mm"] == {"n_ref": 1, "detected": 1, "tpr": 1.0}
    assert o["cluster_by_visible_size"]["4-5 mm"]["detected"] == 0
    assert o["stages_rated"]["candidates"] == {"n_ref": 1, "detected": 0, "tpr": 0.0}
    assert "visible >= 2 mm (1 smaller left out)" in E.format_report(
        E.evaluate_subjects([case]))
    # criterion 0: every reference is rated, the same as the full count
    r0 = E.evaluate_subjects([case], rated_diameter_mm=0.0)["overall"]["cluster_rated"]
    assert (r0["n_ref"], r0["tp"], r0["fp"], r0["n_pred"]) == (2, 1, 1, 2)


def test_swi_scan_is_rated_by_its_own_visible_footprint():
    # the same two CMBs as above; the truth says the SWI phase mask hides the large one (SWI
    # footprint 0 mm) and blooms the small one to 2.5 mm: on the SWI scan the small one is the
    # lesion to find, on a GRE scan of the same truth the label footprint decides as before
    lab = np.zeros(SHAPE, np.uint16)
    cube(lab, CMB2, 1, 1)
    cube(lab, CMB1, 0, 2)
    truth = {"cmbs": [{"id": 1, "centre_ras": ras(*CMB2), "radius_mm": 2.0, "category": "deep",
                       "swi_visible_diameter_mm": 0.0},
                      {"id": 2, "centre_ras": ras(*CMB1), "radius_mm": 0.6, "category": "lobar",
                       "swi_visible_diameter_mm": 2.5}], "mimics": []}
    result = make_result([(CMB1, 0.9, True), (STRAY, 0.9, True)])
    swi = E.evaluate_subjects([E.case_from_result("s_swi", result, truth,
                                                  GRID.with_array(lab))])["overall"]
    r = swi["cluster_rated"]
    assert (r["n_ref"], r["tp"], r["fn"], r["fp"], r["below_criterion"]) == (1, 1, 0, 1, 1)
    assert swi["cluster"]["tp"] == 1 and swi["cluster"]["fn"] == 1  # the full count is unchanged
    result.modality = "gre"
    gre = E.evaluate_subjects([E.case_from_result("s_gre", result, truth,
                                                  GRID.with_array(lab))])["overall"]
    assert (gre["cluster_rated"]["n_ref"], gre["cluster_rated"]["tp"]) == (1, 0)


def test_cli_rating_criterion_option(dataset, capsys):
    out = dataset["tmp"] / "r"
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out),
                 "--rated-diameter-mm", "-1", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rated-diameter-mm" in err[0] and not out.exists()
    # the fixture's CMBs are 3x3x3 voxels (visible 4.3 mm): a 5 mm criterion leaves out both
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "-o", str(out),
                 "--rated-diameter-mm", "5", "-q", "--no-plot"]) == 0
    r = json.loads((out / "evaluation.json").read_text())["overall"]["cluster_rated"]
    assert (r["n_ref"], r["below_criterion"], r["fp"]) == (0, 2, 1)


# --------------------------------------------------------------------------------------------
# --cross-domain: two splits in one run
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def cross_domain(dataset):
    """A second split unlike ``dataset``: sub-101 (GRE) finds its two CMBs, one of them a
    one-voxel footprint (visible 1.4 mm, below the 2 mm criterion), plus a vein FP; sub-102
    (QSM) misses its CMB and has a stray FP. Cluster counts: all 2/3 found, rated 1/2, 1 FP/scan."""
    pred, truth = dataset["tmp"] / "cd_pred", dataset["tmp"] / "cd_truth"
    pred.mkdir()
    truth.mkdir()
    _, lab = truth_files(truth, "sub-101", [(CMB1, 0.6, "lobar"), (CMB2, 2.0, "deep")])
    arr = np.asarray(lab.array).copy()
    arr[arr == 1] = 0
    cube(arr, CMB1, 0, 1)
    write_volume(lab.with_array(arr), truth / "sub-101_cmb.nii.gz")
    truth_files(truth, "sub-102", [(CMB1, 1.0, "lobar")])
    pred_files(pred, "sub-101_gre", make_result([(CMB1, 0.9, True), (CMB2, 0.7, True),
                                                 (VEIN, 0.8, True)], "gre"))
    pred_files(pred, "sub-102_qsm", make_result([(STRAY, 0.9, True)], "qsm"))
    return pred, truth


def single_split(pred, truth, out, *opts):
    assert main(["evaluate", str(pred), str(truth), "-o", str(out), "-q", "--no-plot",
                 *opts]) == 0
    return json.loads((out / "evaluation.json").read_text())


def expected_summary(group, cluster=True):
    a = group["cluster"] if cluster else group["stages"]["cleanup"]
    return {"scans": group["scans"], "truth_cmbs": group["truth_cmbs"],
            "all": (a["n_ref"], a["tpr"], a["fp_per_subject"])}


def test_cli_cross_domain_summary_matches_single_runs(dataset, cross_domain, capsys):
    out, tmp = dataset["tmp"] / "both", dataset["tmp"]
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "--cross-domain",
                 *map(str, cross_domain), "-o", str(out), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    singles = {"cross_domain": single_split(*cross_domain, tmp / "cd"),
               "in_distribution": single_split(dataset["pred"], dataset["truth"], tmp / "id")}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["splits"]) == ["cross_domain", "in_distribution"]
    for key, single in singles.items():
        split = summary["splits"][key]
        per_split = json.loads((out / key / "evaluation.json").read_text())
        assert per_split["overall"] == single["overall"]  # each folder = a single evaluation
        assert (out / key / "evaluation.md").exists()
        assert set(split["by_modality"]) == set(single["by_modality"])
        groups = [(split["overall"], single["overall"])] + [
            (split["by_modality"][m], g) for m, g in single["by_modality"].items()]
        for got, want in groups:
            r = want["cluster_rated"]
            assert (got["scans"], got["truth_cmbs"]) == (want["scans"], want["truth_cmbs"])
            assert (got["all"]["cmbs"], got["all"]["tpr"], got["all"]["fp_per_scan"]) == \
                expected_summary(want)["all"]
            assert (got["visible"]["cmbs"], got["visible"]["tpr"],
                    got["visible"]["fp_per_scan"]) == (r["n_ref"], r["tpr"], r["fp_per_subject"])
    # the numbers known by hand: the two splits are not swapped, rated differs from all
    cd = summary["splits"]["cross_domain"]
    assert cd["overall"]["all"] == {"cmbs": 3, "tpr": pytest.approx(2 / 3), "fp_per_scan": 1.0}
    assert cd["overall"]["visible"] == {"cmbs": 2, "tpr": 0.5, "fp_per_scan": 1.0,
                                        "min_diameter_mm": 2.0}
    assert cd["by_modality"]["qsm"]["all"]["tpr"] == 0.0
    assert summary["splits"]["in_distribution"]["overall"]["all"]["tpr"] == 0.5
    # cross-domain leads, in the printed report and in summary.md
    cd_table, id_table = "### All scans: 2 scans, 2 with CMBs, 3 CMBs", \
        "### All scans: 2 scans, 1 with CMBs, 2 CMBs"
    assert printed.index("## Cross-domain split") < printed.index(cd_table) < \
        printed.index("## In-distribution split") < printed.index(id_table)
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert md.index("| Cross-domain | all | 2 | 3 | 2 | 50.0 % | 1.00 | 66.7 % | 1.00 |") < \
        md.index("| In-distribution | all | 2 | 2 | 2 | 50.0 % | 0.50 | 50.0 % | 0.50 |")


def test_cli_cross_domain_without_label_maps_uses_centroids(dataset, cross_domain):
    out = dataset["tmp"] / "points"
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "--cross-domain",
                 *map(str, cross_domain), "-o", str(out), "-q", "--no-label-maps"]) == 0
    single = single_split(*cross_domain, dataset["tmp"] / "cd_points", "--no-label-maps")
    got = json.loads((out / "summary.json").read_text())["splits"]["cross_domain"]["overall"]
    assert got["rule"].startswith("centroid")
    assert (got["all"]["cmbs"], got["all"]["tpr"], got["all"]["fp_per_scan"]) == \
        expected_summary(single["overall"], cluster=False)["all"] == (3, 2 / 3, 1.0)
    assert got["visible"]["cmbs"] is None  # no label maps: no visible sizes
    assert (out / "cross_domain" / "froc.png").exists()


def test_cli_cross_domain_bad_folder_is_one_line(dataset, cross_domain, capsys):
    out = dataset["tmp"] / "bad"
    missing = dataset["tmp"] / "nope"
    # the cross-domain pair is checked before the in-distribution pair is scored, and back
    for args in ([str(missing), str(cross_domain[1])],
                 [str(cross_domain[0]), str(missing)]):
        assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]),
                     "--cross-domain", *args, "-o", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"cmbdetector: error: {missing}: not a folder"]
    assert main(["evaluate", str(missing), str(dataset["truth"]), "--cross-domain",
                 *map(str, cross_domain), "-o", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"cmbdetector: error: {missing}: not a folder"
    assert not out.exists()
    man = dataset["tmp"] / "m.csv"
    man.write_text("prediction,truth\nsub-001_swi,sub-001\n")
    assert main(["evaluate", str(dataset["pred"]), str(dataset["truth"]), "--cross-domain",
                 *map(str, cross_domain), "--manifest", str(man), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--manifest" in err[0] and not out.exists()
