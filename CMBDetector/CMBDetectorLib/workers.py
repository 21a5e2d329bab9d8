"""Process pools whose workers stop when the process that started them dies.

A ``ProcessPoolExecutor`` worker only notices a dead parent when it next reads its task queue, so
a training run stopped with ``kill`` (or ``pkill`` on its parent) leaves workers simulating
subjects for minutes, and a benchmark started beside them measures the wrong thing. Each worker
made here runs a small thread that ends the worker once its parent process is gone.
"""
from __future__ import annotations

import os
import threading
import time

#: Seconds between two looks at the parent process.
WATCH_INTERVAL = 1.0


def _watch_parent(parent: int, interval: float) -> None:
    """End this process as soon as it has been re-parented (its parent died)."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(interval: float, initializer, initargs: tuple) -> None:
    """Start the parent watch, then the caller's own initializer."""
    if os.name == "posix":  # on Windows getppid() keeps the dead parent's id
        threading.Thread(target=_watch_parent, args=(os.getppid(), interval),
                         name="cmbdetector-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def process_pool(max_workers: int, *, initializer=None, initargs: tuple = (),
                 interval: float = WATCH_INTERVAL):
    """A ``ProcessPoolExecutor`` of ``max_workers`` spawned processes (never forked: the parent
    may hold torch's threads) whose workers exit within about ``interval`` seconds of their
    parent's death."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker,
                               initargs=(interval, initializer, tuple(initargs)))
