"""The pooled invariance gate: the intensity changes, the lesion matching and the verdict."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from CMBDetectorLib.cli.main import main
from CMBDetectorLib.engine.volume import Volume
from CMBDetectorLib.evaluation.invariance import (bias_change, confidence_shifts, format_table,
                                                   gamma_change, gate, noise_change, true_cmbs,
                                                   unmatched)


def _volume(array):
    return Volume(np.asarray(array, np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))


def test_gamma_is_monotone_and_keeps_the_range():
    a = np.linspace(10, 200, 1000).reshape(10, 10, 10)
    for g in (0.7, 1.4):
        out = gamma_change(_volume(a), g).array.ravel()
        assert np.all(np.diff(out) > 0)
        assert out[0] == pytest.approx(10) and out[-1] == pytest.approx(200)
    assert not np.allclose(gamma_change(_volume(a), 0.7).array, a)


def test_qsm_zero_outside_its_mask_stays_zero():
    a = np.zeros((8, 8, 8), np.float32)
    a[2:6, 2:6, 2:6] = np.linspace(-0.1, 0.3, 64).reshape(4, 4, 4)
    a[3, 3, 3] = 0.0  # a zero inside: written as zero too, like the pipeline's
    for change in (lambda v: gamma_change(v, 0.7), bias_change, noise_change):
        out = change(_volume(a)).array
        assert np.all(out[a == 0] == 0)
        assert np.any(out[a != 0] != a[a != 0])


def test_bias_field_is_a_smooth_gain_within_its_strength():
    a = np.full((16, 16, 16), 100.0)
    out = bias_change(_volume(a), 0.25).array / 100.0
    assert out.min() == pytest.approx(np.exp(-0.25), rel=1e-4)
    assert out.max() == pytest.approx(np.exp(0.25), rel=1e-4)


def _lesions(*points):
    return [SimpleNamespace(centroid_ras=p) for p in points]


def test_unmatched_counts_lesions_farther_than_the_match_distance():
    a = _lesions((0, 0, 0), (10, 0, 0), (20, 0, 0))
    b = _lesions((0.5, 0, 0), (13, 0, 0))
    assert unmatched(a, b) == 2
    assert unmatched(b, a) == 1
    assert unmatched([], b) == 0 and unmatched(a, []) == 3


def test_a_changed_lesion_is_a_true_cmb_within_its_visible_radius_or_3_mm():
    cmbs = [{"centre_ras": [0.5, 0, 0], "visible_diameter_mm": 2.0},
            {"centre_ras": [14, 0, 0], "visible_diameter_mm": 9.0,
             "swi_visible_diameter_mm": 4.0}]
    found = _lesions((0, 0, 0), (10, 0, 0), (30, 0, 0))
    assert true_cmbs(found, cmbs, "gre") == 2   # 0.5 mm from the first, 4 mm within 4.5
    assert true_cmbs(found, cmbs, "swi") == 1   # the SWI footprint reaches only 3 mm
    assert true_cmbs(found, [], "gre") == 0 and true_cmbs([], cmbs, "gre") == 0


def test_gate_pools_the_true_cmb_counts_and_the_table_shows_them():
    rows = [dict(_row("swi", "gamma 0.7", 6, 1, 3, 1), lost_cmbs=1, gained_cmbs=3),
            dict(_row("swi", "gamma 0.7", 6, 0, 2, 2), lost_cmbs=0, gained_cmbs=1)]
    result = gate(rows)
    cell = result["cells"][0]
    assert (cell["lost"], cell["lost_cmbs"], cell["gained"], cell["gained_cmbs"]) == (1, 1, 5, 4)
    assert not cell["passed"]  # the verdict counts every change, true CMBs included
    assert "5 (4)" in format_table(result)
    assert "(" not in format_table(gate([_row("swi", "gamma 0.7", 6, 1, 0)])).splitlines()[1]


def _row(mod, change, lesions, lost, gained, seed=0):
    return {"seed": seed, "modality": mod, "change": change, "lesions": lesions, "lost": lost,
            "gained": gained}


def _scored(*pairs):
    return [SimpleNamespace(centroid_ras=p, confidence=c) for p, c in pairs]


def test_confidence_shifts_follow_confident_candidates_to_their_nearest_match():
    ref = _scored(((0, 0, 0), 0.9), ((10, 0, 0), 0.2), ((20, 0, 0), 0.6), ((40, 0, 0), 0.8))
    got = _scored(((0.5, 0, 0), 0.7), ((1.5, 0, 0), 0.1), ((10, 0, 0), 0.9), ((20, 1, 0), 0.65))
    # 0.9 -> 0.7 (the nearer of two), 0.2 is below the floor, 0.6 -> 0.65, 0.8 has no match
    assert confidence_shifts(ref, got) == pytest.approx([0.2, 0.05])
    assert confidence_shifts(ref, got, floor=0.1) == pytest.approx([0.2, 0.7, 0.05])
    assert confidence_shifts(ref, []) == [] and confidence_shifts([], got) == []


def test_gate_reports_the_pooled_confidence_shift_beside_the_verdict():
    rows = [dict(_row("qsm", "gamma 0.7", 6, 0, 0), shifts=[0.0] * 9 + [0.5]),
            dict(_row("qsm", "gamma 0.7", 6, 0, 0), shifts=[0.0] * 9 + [0.5])]
    cell = gate(rows)["cells"][0]
    assert cell["shift_p90"] == pytest.approx(0.05)  # 90th percentile of 18 zeros and two 0.5
    assert cell["passed"]  # a moving confidence alone does not fail the gate
    table = format_table(gate(rows))
    assert "conf. p90" in table and "0.050" in table
    assert "conf. p90" not in format_table(gate([_row("qsm", "gamma 0.7", 6, 0, 0)]))


def test_gate_pools_subjects_per_modality_and_change():
    rows = [_row("gre", "bias field", 4, 2, 0, 1), _row("gre", "bias field", 8, 0, 1, 2),
            _row("qsm", "gamma 0.7", 8, 3, 0, 1)]
    result = gate(rows)
    cells = {(c["modality"], c["change"]): c for c in result["cells"]}
    assert cells[("gre", "bias field")]["lesions"] == 12
    assert cells[("gre", "bias field")]["passed"]          # 3 of 12 = 25 %
    assert not cells[("qsm", "gamma 0.7")]["passed"]       # 3 of 8
    assert not result["passed"]
    assert gate([_row("swi", "more noise", 2, 1, 0)])["passed"]  # one flicker on few lesions
    assert not gate([_row("swi", "more noise", 0, 0, 0)])["passed"]  # nothing to test


def test_cli_rejects_an_unknown_modality(capsys):
    assert main(["invariance", "--modalities", "ct"]) == 1
    assert "unknown modality" in capsys.readouterr().err


def test_cli_refuses_the_split_when_an_anatomy_is_missing(monkeypatch, capsys):
    import CMBDetectorLib.simulation.anatomies as A

    monkeypatch.setattr(A, "available_anatomies", lambda: ["colin27"])
    assert main(["invariance", "--subjects", "1"]) == 1
    err = capsys.readouterr().err
    assert "robex_ref" in err and "--mni152" in err


def test_cli_on_one_small_subject_writes_the_gate(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "inv.json"
    code = main(["invariance", "--subjects", "1", "--mni152", "--modalities", "qsm",
                 "--n-cmbs", "6", "--output", str(out), "--quiet"])
    result = json.loads(out.read_text())
    assert code == (0 if result["passed"] else 3)
    assert [r["change"] for r in result["rows"]] == ["gamma 0.7", "gamma 1.4", "bias field",
                                                     "more noise"]
    assert result["rows"][0]["seed"] == 3_100_000 and result["domains"] == "mni152"
    for r in result["rows"]:
        assert 0 <= r["lost_cmbs"] <= r["lost"] and 0 <= r["gained_cmbs"] <= r["gained"]
        assert all(0.0 <= x <= 1.0 for x in r["shifts"])
    assert ("PASS" if result["passed"] else "FAIL") in capsys.readouterr().out
