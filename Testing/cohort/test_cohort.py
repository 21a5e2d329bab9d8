"""Cohort processing on a real Dask LocalCluster (two worker processes), with the weight-free
stand-in process so the tests do not depend on trained weights."""
from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

distributed = pytest.importorskip("distributed")

from CMBDetectorLib.cohort import batch as cohort  # noqa: E402
from CMBDetectorLib.cli.main import main  # noqa: E402
from CMBDetectorLib.engine.settings import DetectionSettings  # noqa: E402
from CMBDetectorLib.engine.volume import Volume, write_volume  # noqa: E402

THIS = Path(__file__).resolve()


def make_scan(path, n_blobs, seed=0):
    """A 20^3 'brain' (100 +- 3) with ``n_blobs`` dark 2x2x2 blobs (value 10) far apart."""
    rng = np.random.default_rng(seed)
    a = (100 + 3 * rng.standard_normal((20, 20, 20))).astype(np.float32)
    for b in range(n_blobs):
        c = 3 + 5 * b
        a[c:c + 2, c:c + 2, 4:6] = 10.0
    write_volume(Volume.from_arrays(a, spacing=(1.0, 1.0, 1.5)), path)


def make_cohort(folder, counts):
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in counts.items():
        make_scan(folder / f"{name}.nii.gz", n, seed=n)
    (folder / "bad_swi.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 10)


def read_table(path):
    with open(path, newline="") as fh:
        return {r["scan"]: r for r in csv.DictReader(fh)}


def killing_process(path, modality, out_dir, stem, settings, threads=None):
    """On its first attempt at a scan named ``*kill*``, SIGKILL the worker process running it;
    every completed call is logged so the test can count how often each scan was done."""
    work = Path(out_dir).parent.parent
    marker = work / "markers" / f"{stem}.killed"
    if "kill" in stem and not marker.exists():
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # never reached
    info = cohort.blob_process(path, modality, out_dir, stem, settings, threads)
    with open(work / "completed.log", "a") as fh:
        fh.write(stem + "\n")
    return info


killing_process.version = lambda: "killing-test-1"


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_cohort_processes_reports_and_resumes(tmp_path, client):
    counts = {"s1_swi": 1, "s2_swi": 2, "s3_swi": 3}
    make_cohort(tmp_path / "scans", counts)
    out = tmp_path / "out"
    # Leftover of a killed run: a folder without completion record must not count as done.
    (out / "s1_swi").mkdir(parents=True)
    (out / "s1_swi" / "s1_swi_lesions.csv").write_text("half")

    rep = cohort.run_cohort(tmp_path / "scans", out, modality="swi", client=client,
                            process=cohort.BLOB_PROCESS, progress=False)
    table = read_table(out / "cohort.csv")
    assert set(table) == {"s1_swi", "s2_swi", "s3_swi", "bad_swi"}
    for name, n in counts.items():
        row = table[name]
        assert row["status"] == "done", row
        assert int(row["cmb_count"]) == n
        assert row["modality"] == "swi" and row["model_version"] == "blob-stand-in"
        # stand-in alternates deep/lobar: category columns appear and add up
        assert int(row["n_deep"]) + int(row["n_lobar"]) == n
        rec = json.loads((out / name / f"{name}.done.json").read_text())
        assert rec["cmb_count"] == n and len(rec["input_sha256"]) == 64
        assert set(rec["files"]) == {f"{name}.mrk.json", f"{name}_lesions.csv",
                                     f"{name}_cmb.nii.gz", f"{name}_detection.json"}
    assert table["bad_swi"]["status"] == "failed"
    assert "bad_swi.nii.gz" in table["bad_swi"]["reason"]
    assert table["bad_swi"]["cmb_count"] == ""
    assert not (out / "bad_swi").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert rep.count("done") == 3 and rep.count("failed") == 1

    # Re-run: finished scans are skipped (records untouched), the bad one is tried again.
    stamps = {n: (out / n / f"{n}.done.json").stat().st_mtime_ns for n in counts}
    rep2 = cohort.run_cohort(tmp_path / "scans", out, modality="swi", client=client,
                             process=cohort.BLOB_PROCESS, progress=False)
    table2 = read_table(out / "cohort.csv")
    assert [table2[n]["status"] for n in counts] == ["skipped"] * 3
    assert [int(table2[n]["cmb_count"]) for n in counts] == [1, 2, 3]
    assert table2["bad_swi"]["status"] == "failed"
    assert stamps == {n: (out / n / f"{n}.done.json").stat().st_mtime_ns for n in counts}
    assert rep2.count("skipped") == 3

    # A changed input is processed again; a changed setting reprocesses everything.
    make_scan(tmp_path / "scans" / "s2_swi.nii.gz", 0, seed=7)
    table3 = read_table(cohort.run_cohort(tmp_path / "scans", out, modality="swi",
                                          client=client, process=cohort.BLOB_PROCESS,
                                          progress=False).table)
    assert table3["s2_swi"]["status"] == "done" and table3["s2_swi"]["cmb_count"] == "0"
    assert table3["s1_swi"]["status"] == table3["s3_swi"]["status"] == "skipped"
    rep4 = cohort.run_cohort(tmp_path / "scans", out, modality="swi", client=client,
                             process=cohort.BLOB_PROCESS, progress=False,
                             settings=DetectionSettings(threshold=0.7))
    assert rep4.count("done") == 3


def test_killed_worker_every_scan_done_exactly_once(tmp_path, client):
    names = ["a_swi", "b_kill_swi", "c_swi", "d_kill_swi", "e_swi", "f_swi"]
    (tmp_path / "scans").mkdir()
    for n, name in enumerate(names):
        make_scan(tmp_path / "scans" / f"{name}.nii.gz", 1 + n % 3, seed=n)
    out = tmp_path / "work" / "out"
    spec = f"{THIS}:killing_process"
    rep = cohort.run_cohort(tmp_path / "scans", out, modality="swi", client=client,
                            process=spec, progress=False)
    assert sorted((tmp_path / "work" / "markers").iterdir())  # workers really were killed
    assert len(list((tmp_path / "work" / "markers").iterdir())) == 2
    assert [r["status"] for r in rep.rows] == ["done"] * len(names), rep.rows
    completed = (tmp_path / "work" / "completed.log").read_text().split()
    assert sorted(completed) == sorted(names)  # each scan processed to the end exactly once
    table = read_table(out / "cohort.csv")
    assert len(table) == len(names)
    assert [int(table[n]["cmb_count"]) for n in names] == [1 + n % 3 for n in range(6)]
    # the killed attempts' temporary folders never became results and are cleaned up
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["cohort.csv",
                                                                   "cohort_summary.json"])
    client.wait_for_workers(2, timeout=60)


def test_bids_discovery(tmp_path):
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    files = ["sub-01/ses-1/anat/sub-01_ses-1_swi.nii.gz",
             "sub-01/ses-1/anat/sub-01_ses-1_T2starw.nii.gz",
             "sub-01/ses-1/anat/sub-01_ses-1_swi.json",
             "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
             "sub-02/anat/sub-02_acq-mag_Chimap.nii",
             "sub-02/anat/sub-02_swi.nii.gz",
             "derivatives/cmb/sub-01/ses-1/anat/sub-01_ses-1_swi.nii.gz",
             "sourcedata/sub-03_swi.nii.gz"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    scans = cohort.discover(root)
    got = {(s.subject, s.session, s.modality, s.key) for s in scans}
    assert got == {("sub-01", "ses-1", "swi", "sub-01_ses-1_swi"),
                   ("sub-01", "ses-1", "gre", "sub-01_ses-1_T2starw"),
                   ("sub-02", "", "qsm", "sub-02_acq-mag_Chimap"),
                   ("sub-02", "", "swi", "sub-02_swi")}
    assert all("derivatives" not in s.path for s in scans)
    assert {s.key for s in cohort.discover(root, modality="swi")} == {"sub-01_ses-1_swi",
                                                                      "sub-02_swi"}


def test_csv_discovery_and_unique_keys(tmp_path):
    for d in ("p1", "p2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "swi.nii.gz").write_bytes(b"")
    (tmp_path / "list.csv").write_text("path,modality,subject\np1/swi.nii.gz,swi,P1\n"
                                       f"{tmp_path / 'p2' / 'swi.nii.gz'},SWI,P2\n")
    scans = cohort.discover(tmp_path / "list.csv")
    assert [s.key for s in scans] == ["P1_swi", "P2_swi"]
    assert scans[0].path == str(tmp_path / "p1" / "swi.nii.gz") and scans[0].subject == "P1"
    (tmp_path / "bad.csv").write_text("path,modality\np1/swi.nii.gz,t1\n")
    with pytest.raises(cohort.InputError, match="bad.csv:2"):
        cohort.discover(tmp_path / "bad.csv")


def test_plan_local_cluster_never_oversubscribes():
    for cores in (1, 2, 3, 8, 64):
        for workers in (None, 1, 2, 5, 100):
            n, t = cohort.plan_local_cluster(cores=cores, memory_gb=1000, workers=workers)
            assert 1 <= n and n * t <= cores
    assert cohort.plan_local_cluster(cores=2, memory_gb=24) == (1, 2)
    assert cohort.plan_local_cluster(cores=2, memory_gb=24, workers=2) == (2, 1)
    assert cohort.plan_local_cluster(cores=32, memory_gb=12) == (4, 8)  # memory-bound
    assert cohort.cohort_cost(10.0, 50000, nodes=20)["hours"] == pytest.approx(50000 / 200 / 60,
                                                                             abs=0.01)


def test_cli_embedded_cluster_and_scheduler(tmp_path, client, capsys):
    make_cohort(tmp_path / "scans", {"x_swi": 2})
    (tmp_path / "scans" / "bad_swi.nii.gz").unlink()
    out = tmp_path / "out"
    code = main(["batch", str(tmp_path / "scans"), "--output-dir", str(out), "--workers", "1",
                 "--process", "blobs"])
    assert code == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert read_table(out / "cohort.csv")["x_swi"]["cmb_count"] == "2"
    code = main(["batch", str(tmp_path / "scans"), "-o", str(out), "--process", "blobs",
                 "--scheduler", client.scheduler.address])
    assert code == 0 and "0 done, 1 skipped" in capsys.readouterr().out
    code = main(["batch", str(tmp_path / "nowhere"), "-o", str(out), "--process", "blobs"])
    err = capsys.readouterr().err
    assert code == 1 and "no such file" in err and "Traceback" not in err


def test_engine_process_wiring(tmp_path, monkeypatch):
    """The production task calls detect_file + write_outputs with the bundle's operating point
    (engine stubbed: no weights needed) and names every output after the cohort key."""
    from CMBDetectorLib.engine import detection
    from CMBDetectorLib.engine.results import Candidate, DetectionResult

    make_scan(tmp_path / "scan.nii.gz", 0)
    calls = {}

    class Bundle:
        settings = {"threshold": 0.6}
        version = "fake-models-1"

    def fake_detect_file(path, modality, settings=None, models=None, **kw):
        from CMBDetectorLib.engine.volume import read_volume

        calls.update(path=path, modality=modality, threshold=settings.threshold, models=models)
        vol = read_volume(path)
        labels = np.zeros(vol.array.shape, np.int32)
        labels[5, 5, 5], labels[12, 12, 12], labels[15, 15, 15] = 1, 2, 3
        cands = [Candidate(n, (float(n), 0.0, 0.0), (5.0, 5.0, 5.0), 4.0, 0.9, conf, kept)
                 for n, conf, kept in ((1, 0.95, True), (2, 0.65, True), (3, 0.99, False))]
        return vol, DetectionResult("swi", vol.ijk_to_ras, vol.array.shape, cands, labels,
                                    settings.threshold, model_version="fake-models-1")

    monkeypatch.setitem(cohort._MODELS, "cpu", Bundle())
    monkeypatch.setattr(detection, "detect_file", fake_detect_file)
    out = tmp_path / "o"
    out.mkdir()
    info = cohort.engine_process(str(tmp_path / "scan.nii.gz"), "swi", str(out), "sub-01_swi",
                                 {"device": "cpu", "location": False}, threads=1)
    assert calls["threshold"] == 0.6 and isinstance(calls["models"], Bundle)
    assert info["cmb_count"] == 2 and info["model_version"] == "fake-models-1"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["sub-01_swi.mrk.json", "sub-01_swi_lesions.csv", "sub-01_swi_cmb.nii.gz",
         "sub-01_swi_detection.json"])
    info = cohort.engine_process(str(tmp_path / "scan.nii.gz"), "swi", str(out), "sub-01_swi",
                                 {"device": "cpu", "location": False, "threshold": 0.9})
    assert info["cmb_count"] == 1 and calls["threshold"] == 0.9


def test_missing_weights_fail_before_any_cluster(tmp_path, monkeypatch, capsys):
    from CMBDetectorLib.engine import models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path / "no-models")
    make_cohort(tmp_path / "scans", {"x_swi": 1})
    code = main(["batch", str(tmp_path / "scans"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "no trained weights" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "cohort.csv").exists()


def logging_process(path, modality, out_dir, stem, settings, threads=None, prepared=None):
    """The blob process; logs when each scan's detection starts (prefetch queue test)."""
    _log(Path(path).parent, f"detect {stem}")
    time.sleep(0.3)
    return cohort.blob_process(path, modality, out_dir, stem, settings, threads, prepared)


def _logging_prepare(path, modality, settings):
    _log(Path(path).parent, f"prepare {Path(path).name.split('.')[0]}")
    return cohort.blob_process.prepare(path, modality, settings)


def _log(folder, line):
    with open(folder / "order.log", "a") as fh:
        fh.write(line + "\n")


logging_process.prepare = _logging_prepare
logging_process.version = lambda: "logging-test-1"


def test_prefetch_queue_is_bounded_and_keeps_the_scan_order(tmp_path):
    counts = {f"s{n}_swi": n % 3 for n in range(6)}
    make_cohort(tmp_path / "scans", counts)
    rep = cohort.run_cohort(tmp_path / "scans", tmp_path / "out", process=f"{THIS}:logging_process",
                            prefetch=2, threads=1, progress=False)
    rows = read_table(rep.table)
    assert rows["bad_swi"]["status"] == "failed" and rows["bad_swi"]["reason"]
    assert all(rows[k]["status"] == "done" and int(rows[k]["cmb_count"]) == n
               for k, n in counts.items())
    events = (tmp_path / "scans" / "order.log").read_text().splitlines()
    detected = [e.split()[1] for e in events if e.startswith("detect")]
    assert detected == sorted(counts)  # in order; bad_swi (first) failed before detection
    for n, key in enumerate(detected, start=1):  # scan n of the queue (bad_swi is 0) is
        at = events.index(f"detect {key}")       # detected with at most 2 prepared after it
        assert sum(e.startswith("prepare") for e in events[:at]) <= n + 1 + 2


def test_throughput_summary_counts_scans_done_in_this_run():
    rows = [{"status": "done", "timings_s": {"reading": 1.0, "candidate detection": 10.0}},
            {"status": "done", "timings_s": {"reading": 2.0, "candidate detection": 8.0}},
            {"status": "skipped", "timings_s": {"reading": 50.0}},
            {"status": "failed"}]
    s = cohort.throughput_summary(rows, 30.0, "prefetch")
    assert s["scans_per_min"] == 4.0 and (s["done"], s["skipped"], s["failed"]) == (2, 1, 1)
    assert s["stage_totals_s"] == {"reading": 3.0, "candidate detection": 18.0}
    assert "4.00 scans/min" in cohort.throughput_line(s)


@pytest.fixture(scope="module")
def simulated_scans(tmp_path_factory):
    """Three small simulated SWI scans (48 mm cubes with CMBs) and one unreadable file."""
    from CMBDetectorLib.simulation.simulator import SimulationConfig, simulate_subject

    folder = tmp_path_factory.mktemp("simscans")
    for seed in (11, 12, 13):
        subj = simulate_subject(seed, SimulationConfig(roi_mm=56.0, spacing_mm=(0.9, 0.9, 1.5),
                                                       n_cmbs=3))
        write_volume(subj.images["swi"], folder / f"sim{seed}_swi.nii.gz")
    (folder / "bad_swi.nii.gz").write_bytes(b"not a NIfTI" * 20)
    return folder


def test_prefetch_outputs_equal_the_sequential_engine(simulated_scans, tmp_path):
    """Real engine (bundled weights, low operating point so there are lesions): prefetched
    scans give the files of the per-scan task, byte for byte apart from the timings."""
    pytest.importorskip("torch")
    from CMBDetectorLib.engine.volume import read_volume

    settings = {"device": "cpu", "location": False, "threshold": 0.0,
                "candidate_threshold": 0.05, "min_edge_distance_mm": 0.0}
    rep = cohort.run_cohort(simulated_scans, tmp_path / "pre", settings=settings, prefetch=2,
                            threads=2, progress=False)
    rows = read_table(rep.table)
    keys = ["sim11_swi", "sim12_swi", "sim13_swi"]
    lesions = 0
    for key in keys:
        seq = tmp_path / "seq" / key
        seq.mkdir(parents=True)
        info = cohort.engine_process(str(simulated_scans / f"{key}.nii.gz"), "swi", str(seq), key,
                                     dict(settings), threads=2)
        pre = tmp_path / "pre" / key
        assert rows[key]["status"] == "done" and int(rows[key]["cmb_count"]) == info["cmb_count"]
        for name in (f"{key}_lesions.csv", f"{key}.mrk.json"):
            assert (pre / name).read_bytes() == (seq / name).read_bytes()
        a, b = (read_volume(d / f"{key}_cmb.nii.gz") for d in (pre, seq))
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.ijk_to_ras, b.ijk_to_ras)
        ja, jb = (json.loads((d / f"{key}_detection.json").read_text()) for d in (pre, seq))
        assert {k: v for k, v in ja.items() if k != "timings_s"} == \
            {k: v for k, v in jb.items() if k != "timings_s"}
        lesions += info["cmb_count"]
    assert lesions > 0, "the low operating point should report some lesions"
    assert rows["bad_swi"]["status"] == "failed" and "bad_swi" in rows["bad_swi"]["reason"]
    summary = json.loads((tmp_path / "pre" / "cohort_summary.json").read_text())
    assert summary["mode"] == "prefetch" and summary["done"] == 3 and summary["failed"] == 1
    assert summary["scans_per_min"] > 0
    assert {"reading", "preprocessing", "candidate detection", "writing"} <= \
        set(summary["stage_totals_s"])
