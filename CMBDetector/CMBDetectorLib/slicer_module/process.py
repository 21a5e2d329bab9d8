"""The detection worker as a child process: start, poll without blocking, kill the whole tree.

Inside Slicer the worker is started through ``PythonSlicer``, a launcher that runs the real
Python as *its* child. Killing only the launcher leaves the worker running (it then recreates
deleted folders and holds the GPU), so the worker starts in its own process group / session and
Cancel kills every process of it. On Windows it also gets no console window (what Slicer's
``launchConsoleProcess`` does). Polling is non-blocking, so a Qt timer can drive it and the GUI
never waits in a nested event loop.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from ..errors import Cancelled, CMBError

PROGRESS_TAG = "CMB-PROGRESS"
ERROR_TAG = "CMB-ERROR"
WARNING_TAG = "CMB-WARNING"
DONE_TAG = "CMB-DONE"

# Windows process creation flags (literal values: the names exist only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def popen_options(platform: str | None = None) -> dict:
    """``subprocess.Popen`` keyword arguments that put the child in its own process group
    (so the group can be killed) and, on Windows, hide its console window."""
    platform = platform or sys.platform
    if platform.startswith("win"):
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (the launcher's child included)."""
    platform = sys.platform
    try:
        import psutil  # bundled with Slicer; optional elsewhere
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
    if platform.startswith("win"):
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       creationflags=CREATE_NO_WINDOW)
    else:
        try:  # the worker is a session leader: its pid is the group id
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


def worker_environment(env=None) -> dict:
    """The environment for a worker: this package importable, unbuffered output."""
    lib_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class WorkerRun:
    """One running worker. :meth:`poll` relays progress and returns True once it has ended.

    ``progress(stage, fraction)`` receives ``CMB-PROGRESS`` lines; ``CMB-WARNING`` lines are
    collected in :attr:`warnings`; :meth:`check` raises :class:`CMBError` with the worker's
    ``CMB-ERROR`` message (or its last output lines) when it failed.
    """

    def __init__(self, cmd, progress=None, env=None):
        self.cmd = list(cmd)
        self.progress = progress
        self.errors: list = []
        self.warnings: list = []
        self.tail: list = []
        self.cancelled = False
        self._lines: list = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=worker_environment(env), text=True, bufsize=1,
                                     **popen_options())
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:  # a reader thread: poll() never blocks on the pipe
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def _handle(self, line: str) -> None:
        parts = line.split("\t")
        if parts[0] == PROGRESS_TAG and len(parts) == 3:
            if self.progress is not None:
                self.progress(parts[1], float(parts[2]))
        elif parts[0] == ERROR_TAG:
            self.errors.append("\t".join(parts[1:]))
        elif parts[0] == WARNING_TAG:
            self.warnings.append("\t".join(parts[1:]))
        elif parts[0] != DONE_TAG:
            self.tail.append(line)
            del self.tail[:-20]

    def poll(self) -> bool:
        """Handle the output so far; True when the worker has exited and all output is read."""
        finished = self.proc.poll() is not None and not self._reader.is_alive()
        with self._lock:
            pending, self._lines[:] = list(self._lines), []
        for line in pending:
            self._handle(line)
        return finished

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Kill the worker and everything it started; later :meth:`check` raises Cancelled."""
        self.cancelled = True
        kill_process_tree(self.proc)

    def check(self) -> None:
        """Raise what went wrong, if anything (call after :meth:`poll` returned True)."""
        if self.cancelled:
            raise Cancelled("detection cancelled")
        if self.proc.returncode != 0:
            if self.errors:
                raise CMBError(self.errors[-1])
            raise CMBError("detection worker failed (exit code %s): %s"
                           % (self.proc.returncode, " | ".join(self.tail[-5:]) or "no output"))

    def wait(self, cancel=None, idle=None, pollSeconds: float = 0.05) -> None:
        """Block until the worker ends (scripts and tests); ``cancel()`` True kills it."""
        try:
            while not self.poll():
                if cancel is not None and cancel():
                    self.kill()
                    break
                if idle is not None:
                    idle()
                time.sleep(pollSeconds)
        finally:
            if self.running:
                self.kill()
        self.check()
