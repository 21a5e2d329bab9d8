"""The verdicts of compare_devices.py (the CPU-vs-CUDA report of device_check.sh), on the CPU."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import compare_devices as cd

HERE = Path(__file__).parent


def _summary(conf=(0.9, 0.2), lesions=((10.0, 20.0, 30.0),)):
    places = ([10.0, 20.0, 30.0], [-5.0, 0.0, 12.0])
    return {"candidates": [p + [c] for p, c in zip(places, conf)],
            "lesions": [list(p) for p in lesions]}


def test_identical_and_empty_results_agree():
    assert cd.agreement(_summary(), _summary())["ok"]
    assert cd.agreement(_summary((), ()), _summary((), ()))["ok"]


def test_a_confidence_gap_over_the_tolerance_is_a_difference():
    out = cd.agreement(_summary(), _summary((0.9, 0.2 + 2 * cd.CONFIDENCE)))
    assert not out["ok"] and out["same_lesions"]
    assert np.isclose(out["max_confidence_diff"], 2 * cd.CONFIDENCE)


def test_a_missing_candidate_or_a_moved_lesion_is_a_difference():
    assert not cd.agreement(_summary(), _summary((0.9,)))["ok"]
    moved = cd.agreement(_summary(), _summary(lesions=((10.0, 20.2, 30.0),)))
    assert not moved["same_lesions"] and not moved["ok"]
    assert not cd.agreement(_summary(), _summary(lesions=()))["ok"]


def test_reference_round_trip_and_image_tolerance():
    cfg = SimpleNamespace(anatomy="mni152", roi_mm=None)
    image = np.random.default_rng(1).normal(size=(20, 30, 40)).astype(np.float32)
    volume = SimpleNamespace(array=image * 100)
    side = cd.Side("cpu", _summary(), image, 0.0, 0.0)
    ref = json.loads(json.dumps(cd.reference_entry(cfg, volume, side)))
    assert cd.against_reference(ref, cfg, volume, side)["ok"]
    worse = replace(side, image=image + 3 * cd.IMAGE)
    out = cd.against_reference(ref, cfg, volume, worse)
    assert not out["ok"] and out["max_image_diff"] > cd.IMAGE
    other = cd.against_reference(ref, SimpleNamespace(anatomy="mni152", roi_mm=64.0), volume, side)
    assert not other["compared"] and "roi" in other["why"]


def test_an_anatomy_that_is_not_installed_becomes_mni152_with_a_note():
    drawn, note = cd.scan_config(3_100_000, installed=("icbm152_sym55",))
    assert drawn.anatomy == "icbm152_sym55" and note == ""
    fallback, note = cd.scan_config(3_100_000, installed=())
    assert fallback == replace(drawn, anatomy="mni152") and "icbm152_sym55" in note


def test_the_recorded_reference_covers_the_planned_scans():
    ref = json.loads((HERE / "reference_cpu.json").read_text())
    planned = [f"{seed}:{modality}" for seed, modality in cd.plan(3)]
    assert [m for _, m in cd.plan(3)] == ["swi", "gre", "qsm"]
    assert sorted(ref) == sorted(planned)
    assert all(e["anatomy"] == "mni152" and e["roi_mm"] is None for e in ref.values())


def test_the_verdict_names_each_comparison():
    same = {"cpu_vs_cuda": {"ok": True}, "vs_reference": {"compared": True, "ok": False}}
    line = cd.verdict([same], None)
    assert line.startswith("devices: the same") and "reference_cpu.json (1 scans): DIFFERENT" in line
    assert "reference" not in cd.verdict([{"cpu_vs_cuda": {"ok": True}}], None)
