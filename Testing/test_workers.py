"""Workers of :func:`process_pool` exit when their parent dies; plain pool workers do not."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the parent watch is POSIX-only")

PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from CMBDetectorLib.workers import process_pool

if sys.argv[1] == "watched":
    pool = process_pool(1, interval=0.2)
else:
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
pid = pool.submit(os.getpid).result()
pool.submit(time.sleep, 120)
time.sleep(0.5)
print(pid, flush=True)
os._exit(0)  # the parent dies without shutting its pool down
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return "\nState:\tZ" not in status


def _orphan(kind: str) -> int:
    lib = Path(__file__).resolve().parents[1] / "CMBDetector"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")]))
    # read one line, not to EOF: an orphaned worker keeps the pipe open
    proc = subprocess.Popen([sys.executable, "-c", PARENT, kind], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    assert proc.wait(timeout=60) == 0
    proc.stdout.close()
    return int(line)


def _wait_dead(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_watched_worker_exits_with_its_parent():
    pid = _orphan("watched")
    try:
        assert _wait_dead(pid, 10.0), "worker still running 10 s after its parent died"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_plain_worker_outlives_its_parent():
    """The control: without the watch the orphan keeps running its task."""
    pid = _orphan("plain")
    try:
        assert not _wait_dead(pid, 2.0)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
