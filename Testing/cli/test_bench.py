"""`cmbdetector bench`: per-stage peak memory, and `--device cuda` where there is no CUDA."""
from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib.cli import bench
from CMBDetectorLib.cli.main import main


def test_stage_meter_attributes_a_peak_to_the_stage_that_made_it():
    """300 MB touched and freed inside "big" must show there, not in "small" after it."""
    with bench.StageMeter(interval_s=0.001) as meter:
        meter.progress("small", 0.0)
        np.ones(1000, np.float64).sum()
        meter.progress("big", 0.5)
        a = np.ones(300 * 10 ** 6 // 8)
        a.sum()
        del a
        meter.progress("after", 0.9)
        meter.progress("done", 1.0)
    peaks = meter.peaks_gb
    assert set(peaks) == {"small", "big", "after"}
    assert peaks["big"] - peaks["small"] > 0.25
    assert peaks["big"] - peaks["after"] > 0.25
    assert meter.cuda_peaks_gb == {}


def test_memory_table_lists_every_stage_of_every_case():
    det = [{"case": "c1", "stages_peak_rss_gb": {"preprocessing": 1.2, "clean-up": 1.4}},
           {"case": "c2", "stages_peak_rss_gb": {"candidate detection": 2.0},
            "stages_peak_cuda_gb": {"candidate detection": 0.8}}]
    rows = bench.memory_table(det)
    assert rows[0].startswith("| case | memory GB | load | preprocess | candidates")
    assert "| c1 | peak RSS |  | 1.2 |  |  | 1.4 |" in rows
    assert "| c2 | CUDA |  |  | 0.8 |  |  |" in rows


def test_cuda_bench_skips_with_a_reason_without_cuda(capsys):
    if not bench.cuda_missing():
        pytest.skip("this machine has CUDA: the skip path does not apply")
    assert main(["bench", "--device", "cuda", "--skip-location"]) == 0
    err = capsys.readouterr().err
    assert "skipped: --device cuda" in err and "CUDA" in err


def test_cli_wall_times_a_real_detect_run_in_a_fresh_process(monkeypatch, small_subject):
    pytest.importorskip("torch")
    monkeypatch.setattr(bench, "bench_volume", lambda shape, spacing: small_subject.images["swi"])
    out = bench.cli_wall(next(iter(bench.CASES)), "cpu", repeats=1)
    assert "error" not in out, out
    assert out["wall_s"] > 0.5  # an interpreter start and a detection, not a no-op
    assert out["runs_s"] == [out["wall_s"]]
    text = bench.format_table({"detection": [], "cli": out,
                               "frst": {"subvolume": "48^3", "vectorised_s": 0.01, "loop_s": 1.0,
                                        "speedup": 100.0, "whole_brain_vectorised_s": 0.5,
                                        "whole_brain_shape": [1, 2, 3]}})
    assert f"{out['wall_s']} s" in text and "fresh process" in text


def test_cli_wall_reports_a_failed_run(monkeypatch, tmp_path):
    from CMBDetectorLib.engine.volume import Volume

    # Not a brain: detection refuses it with a one-line error, which the bench reports.
    monkeypatch.setattr(bench, "bench_volume", lambda shape, spacing: Volume.from_arrays(
        np.zeros((20, 20, 20), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    out = bench.cli_wall(next(iter(bench.CASES)), "cpu", repeats=1)
    assert "wall_s" not in out and out["error"]
