"""The worker process: Cancel kills the whole process tree (``PythonSlicer`` is a launcher that
runs the real Python as its child), no console window on Windows, errors in one line."""
from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest

from CMBDetectorLib.slicer_module.process import (CREATE_NO_WINDOW, WorkerRun, kill_process_tree,  # noqa: F401
                                    popen_options)


def _launcher(tmp_path):
    """An executable like PythonSlicer: runs the real Python as a child and waits for it."""
    path = tmp_path / "PythonLauncher"
    path.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys
        sys.exit(subprocess.call([{sys.executable!r}] + sys.argv[1:]))
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX launcher script")
def test_cancel_through_a_launcher_kills_the_real_worker(tmp_path):
    slicer = pytest.importorskip("slicer")  # noqa: F841
    from CMBDetectorLib.slicer_module.selftest import cancel_kills_the_worker
    from slicer_scene_helpers import make_app

    scene, _app, _logics = make_app()
    latency = cancel_kills_the_worker(scene, python=_launcher(tmp_path))
    assert latency < 2.0
    scene.Clear(1)


def test_popen_options_hide_the_console_on_windows_and_group_on_posix():
    win = popen_options("win32")
    assert win["creationflags"] & CREATE_NO_WINDOW
    assert "start_new_session" not in win
    assert popen_options("linux") == {"start_new_session": True}


def test_worker_error_is_one_line(tmp_path):
    from CMBDetectorLib.errors import CMBError

    run = WorkerRun([sys.executable, "-c",
                     "print('CMB-ERROR\\tthe scan is 2D'); import sys; sys.exit(1)"])
    with pytest.raises(CMBError, match="^the scan is 2D$"):
        run.wait()


def test_worker_warnings_are_collected():
    run = WorkerRun([sys.executable, "-c",
                     "print('CMB-WARNING\\tCUDA out of memory; retrying on the CPU')"])
    run.wait()
    assert run.warnings == ["CUDA out of memory; retrying on the CPU"]


def test_kill_process_tree_ends_a_grandchild(tmp_path):
    """The grandchild (the launcher's child) is gone after the kill, not only the child."""
    from CMBDetectorLib.slicer_module.selftest import process_alive

    pidfile = tmp_path / "pid"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))"
                          "\ntime.sleep(60)\n")
    code = f"import subprocess, sys; subprocess.call([sys.executable, {str(grandchild)!r}])"
    run = WorkerRun([sys.executable, "-c", code])
    import time
    t0 = time.monotonic()
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert process_alive(pid)
    run.kill()
    t0 = time.monotonic()
    while process_alive(pid) and time.monotonic() - t0 < 2:
        time.sleep(0.02)
    assert not process_alive(pid)
    assert os.path.exists(pidfile)
