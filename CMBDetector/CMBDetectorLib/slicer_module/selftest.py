"""Scenarios of the in-Slicer test (``CMBDetectorTest``), runnable on any MRML scene.

Each scenario takes the scene, builds what it needs from nothing (ctest runs every test method on
its own after ``mrmlScene.Clear()``) and asserts with plain ``assert``. ``CMBDetector.py`` runs
them inside Slicer; ``Testing/slicer_module/test_selftest.py`` runs them on slicer-core, one by one after
``scene.Clear()``, the way ctest does. The detector is the stand-in of :mod:`.standins`.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np


def add_scan(scene, name="sub-01_swi"):
    """The stand-in oblique scan as a volume node, and its true lesion centres (RAS)."""
    from .standins import add_volume, synthetic_scan

    arr, m, truth = synthetic_scan()
    node = add_volume(scene, arr, m, name=name)
    return node, np.array([t["centre_ras"] for t in truth])


def _logic(scene, **kw):
    from .logic import CMBDetectorLogic
    from .standins import dark_blob_detector

    return CMBDetectorLogic(scene, detector=kw.pop("detector", dark_blob_detector), **kw)


def detect_review_export(scene) -> None:
    """Detect under a parent transform, re-threshold, review, re-run, cancel, export."""
    from . import mrml
    from ..errors import Cancelled
    from .standins import add_linear_transform

    node, truth = add_scan(scene)
    t = np.eye(4)
    t[:3, 3] = [12.0, 0.0, -7.0]
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, t).GetID())
    truth = truth + t[:3, 3]
    logic = _logic(scene)
    nodes = logic.process(node, "SWI", threshold=0.3)
    fid = nodes["fiducial"]
    found = np.array([mrml.point_info(fid, n)["ras"] for n in range(fid.GetNumberOfControlPoints())])
    assert len(found) == len(truth) == 5, len(found)
    assert np.linalg.norm(truth[:, None] - found[None], axis=2).min(axis=1).max() < 1.0
    assert nodes["table"].GetNumberOfRows() == 5
    assert logic.setThreshold(node, 0.7) == 2
    logic.setStatus(node, 1, "rejected")
    count = scene.GetNumberOfNodes()
    logic.process(node, "SWI", threshold=0.7)
    assert scene.GetNumberOfNodes() == count
    assert mrml.get_status(fid, 1) == "rejected"
    try:
        logic.process(node, "SWI", cancel=lambda: True)
        raise AssertionError("cancel did not raise")
    except Cancelled:
        pass
    assert scene.GetNumberOfNodes() == count
    with tempfile.TemporaryDirectory() as tmp:
        paths = logic.export(node, tmp)
        back = mrml.read_markups(paths["markups"])
        assert back.GetNumberOfControlPoints() == 2
        assert mrml.get_status(back, 1) == "rejected"
        assert mrml.read_table(paths["csv"]).GetNumberOfRows() == 2


def bad_input(scene) -> None:
    """A 2D volume is refused with one line naming it; the scene is unchanged."""
    from . import mrml
    from ..errors import InputError
    from .standins import add_volume

    node = add_volume(scene, np.zeros((1, 32, 32), np.float32), np.eye(4), name="flat")
    sig = mrml.scene_signature(scene)
    try:
        _logic(scene).process(node, "SWI")
        raise AssertionError("a 2D volume was accepted")
    except InputError as exc:
        assert str(exc).startswith("flat"), exc
    assert mrml.scene_signature(scene) == sig


def no_stale_results_after_close(scene) -> None:
    """File > Close Scene, then a new CMB-free scan with the recycled node ID: moving the
    threshold (or the modality) must not publish the previous scan's lesions on it."""
    from .panel import PanelController, PanelParameters
    from .standins import add_volume

    logic = _logic(scene)
    controller = PanelController(logic)
    node_a, _ = add_scan(scene, "scan A")
    params = PanelParameters(inputVolume=node_a, modality="SWI", thresholdFromModels=True,
                             threshold=0.3)
    controller.setParameters(params)
    logic.process(node_a, "SWI", threshold=0.3)
    assert logic.resultNodes(node_a)["fiducial"].GetNumberOfControlPoints() == 5
    old_id = node_a.GetID()
    scene.Clear(0)
    assert controller.params is None and not logic.results
    rng = np.random.default_rng(1)
    clean = (1000 + 10 * rng.standard_normal((26, 60, 64))).astype(np.float32)
    node_b = add_volume(scene, clean, np.diag([0.8, 0.9, 1.8, 1.0]), name="scan B")
    assert node_b.GetID() == old_id  # what makes the bug possible
    params = PanelParameters(inputVolume=node_b, modality="SWI", thresholdFromModels=True,
                             threshold=0.3)
    controller.setParameters(params)
    params.threshold = 0.5
    controller.parametersModified()
    params.modality = "QSM"
    controller.parametersModified()
    assert controller.resultNodes() == {}
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0
    controller.cleanup()


def threshold_follows_the_modality_until_moved(scene) -> None:
    """The slider starts at the models' validated threshold and follows the modality until the
    reviewer moves it."""
    from .panel import PanelController, PanelParameters, model_threshold

    swi, qsm = model_threshold("SWI"), model_threshold("QSM")
    if swi is None or qsm is None:
        return  # no bundled weights: nothing to follow
    controller = PanelController(_logic(scene))
    params = PanelParameters(modality="SWI")
    controller.setParameters(params)
    assert abs(params.threshold - swi) < 1e-6
    params.modality = "QSM"
    controller.parametersModified()
    assert abs(params.threshold - qsm) < 1e-6
    params.threshold = 0.33  # the reviewer's own value stays
    controller.parametersModified()
    params.modality = "T2*-GRE"
    controller.parametersModified()
    assert abs(params.threshold - 0.33) < 1e-6
    controller.cleanup()


def process_alive(pid: int):
    """True/False whether ``pid`` runs (a zombie counts as ended); None when unknowable."""
    try:
        import psutil
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    except ImportError:
        pass
    stat = f"/proc/{pid}/stat"
    if os.path.exists("/proc"):
        try:
            with open(stat) as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    return None


def cancel_kills_the_worker(scene, python=None, timeout: float = 2.0) -> float:
    """Cancel a slow worker (started through ``python``, e.g. a launcher): the worker process
    itself is gone within ``timeout`` s, its temporary folder is not recreated, the scene is
    unchanged. Returns the kill latency in seconds."""
    from . import mrml
    from ..errors import Cancelled
    from .standins import PIDFILE_ENV

    node, _ = add_scan(scene)
    logic = _logic(scene, detector=None)
    scene.GetSubjectHierarchyNode()  # always there in Slicer; created on first use here
    sig = mrml.scene_signature(scene)
    pidfile = os.path.join(tempfile.mkdtemp(prefix="CMBDetector-test-"), "worker.pid")
    os.environ[PIDFILE_ENV] = pidfile
    try:
        run = logic.startInSubprocess(node, "SWI", python=python or _python(),
                                      detectorSpec="CMBDetectorLib.slicer_module.standins:slow_detector")
        deadline = time.monotonic() + 60
        while not os.path.exists(pidfile) or not open(pidfile).read().strip():
            run.poll()
            assert time.monotonic() < deadline, "the worker never started: " + str(run.worker.tail)
            time.sleep(0.05)
        pid = int(open(pidfile).read())
        assert process_alive(pid) is not False
        t0 = time.perf_counter()
        run.cancel()
        while process_alive(pid) and time.perf_counter() - t0 < timeout:
            time.sleep(0.02)
        latency = time.perf_counter() - t0
        assert process_alive(pid) is not True, f"worker {pid} still runs after Cancel"
        time.sleep(0.3)
        assert not os.path.exists(run.work), "the worker recreated its temporary folder"
        try:
            logic.finishRun(run)
            raise AssertionError("a cancelled run was published")
        except Cancelled:
            pass
        assert mrml.scene_signature(scene) == sig
        return latency
    finally:
        os.environ.pop(PIDFILE_ENV, None)


def _python() -> str:
    from .logic import worker_python

    return worker_python() if "slicer" in sys.modules and hasattr(
        sys.modules["slicer"], "app") else sys.executable


SCENARIOS = {"bad_input": bad_input, "cancel_kills_the_worker": cancel_kills_the_worker,
             "detect_review_export": detect_review_export,
             "no_stale_results_after_close": no_stale_results_after_close,
             "threshold_follows_the_modality_until_moved":
                 threshold_follows_the_modality_until_moved}
