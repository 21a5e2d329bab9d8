"""``CMBDetector.py`` itself, imported and driven headless: the module's metadata, the widget's
wiring (signals in, controller calls, what the panel shows) and the in-Slicer test class run the
way ctest runs it, over a real MRML scene (``fake_slicer_gui`` stands in for Qt)."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("slicer")

import fake_slicer_gui as gui  # noqa: E402
from slicer_scene_helpers import add_volume, make_app, synthetic_scan  # noqa: E402

STANDIN = "CMBDetectorLib.slicer_module.standins:"


@pytest.fixture()
def slicer_gui(monkeypatch):
    scene, _app, _logics = make_app()
    module, recorded = gui.install(scene, monkeypatch)
    yield scene, module, recorded
    if recorded.widget is not None:
        recorded.widget.cleanup()
    scene.Clear(1)


def _panel(slicer_gui, detector="dark_blob_detector"):
    scene, module, recorded = slicer_gui
    widget = gui.make_widget(module, recorded)
    widget.controller.python = sys.executable
    widget.controller.detectorSpec = STANDIN + detector
    gui.pump(widget)  # the device probe
    return widget


def test_module_metadata(slicer_gui):
    _scene, module, recorded = slicer_gui
    parent = gui.Parent()
    module.CMBDetector(parent)
    assert parent.categories == ["Quantification"]
    assert ("qSlicerAbstractCoreModule", "Quantification") in recorded.translations
    assert parent.contributors == module.CONTRIBUTORS
    assert "Not for diagnostic use" in parent.helpText and "Sundaresan" in parent.acknowledgementText
    assert recorded.app_slots == ["startupCompleted()"]


def test_detect_review_and_export_through_the_widget(slicer_gui, tmp_path):
    scene = slicer_gui[0]
    widget = _panel(slicer_gui)
    ui = widget.ui
    assert ui.deviceInfoLabel.text.startswith("torch ")  # asked of a child Python
    arr, m, _ = synthetic_scan()
    node = add_volume(scene, arr, m, name="7: T2star hemo")
    widget._parameterNode.inputVolume = node  # what the volume selector's binding does
    assert widget._parameterNode.modality == "T2*-GRE"  # guessed from the name
    widget._parameterNode.threshold = 0.5
    ui.detectButton.emit("clicked(bool)", False)
    assert widget._timer.active
    assert not ui.inputVolumeSelector.enabled and not ui.thresholdSlider.enabled
    assert ui.cancelButton.enabled and not ui.detectButton.enabled
    gui.pump(widget)
    assert ui.statusLabel.text.startswith("Done: 4 lesion(s)"), ui.statusLabel.text
    assert ui.lesionCountLabel.text == "4" and ui.resultsTableView.table is not None
    assert ui.inputVolumeSelector.enabled and ui.exportButton.enabled and not ui.cancelButton.enabled
    widget._parameterNode.threshold = 0.7  # the slider
    assert ui.lesionCountLabel.text == "2"
    ui.resultsTableView.selectedRows = [1]
    ui.rejectButton.emit("clicked()")
    fid = widget.controller.resultNodes()["fiducial"]
    from CMBDetectorLib.slicer_module import mrml
    assert mrml.get_status(fid, 1) == "rejected"
    widget._parameterNode.outputDirectory = tmp_path
    ui.exportButton.emit("clicked(bool)", False)
    assert (tmp_path / "7__T2star_hemo.mrk.json").exists(), ui.statusLabel.text
    assert ui.statusLabel.text.startswith("Wrote:")


def test_close_scene_then_a_new_scan_shows_nothing_old(slicer_gui):
    scene = slicer_gui[0]
    widget = _panel(slicer_gui)
    arr, m, _ = synthetic_scan()
    node = add_volume(scene, arr, m, name="scan A swi")
    old_id = node.GetID()
    widget._parameterNode.inputVolume = node
    widget.ui.detectButton.emit("clicked(bool)", False)
    gui.pump(widget)
    assert widget.ui.lesionCountLabel.text != "-"
    scene.Clear(0)  # File > Close Scene: the widget re-creates its parameter node
    import numpy as np
    clean = (1000 + 10 * np.random.default_rng(1).standard_normal(arr.shape)).astype(np.float32)
    new = add_volume(scene, clean, m, name="scan B swi")
    assert new.GetID() == old_id
    widget._parameterNode.inputVolume = new
    widget._parameterNode.threshold = 0.3
    widget._parameterNode.modality = "QSM"
    assert widget.ui.lesionCountLabel.text == "-"
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0


def test_cancel_button_stops_the_run(slicer_gui):
    scene = slicer_gui[0]
    widget = _panel(slicer_gui, "slow_detector")
    arr, m, _ = synthetic_scan()
    widget._parameterNode.inputVolume = add_volume(scene, arr, m)
    widget.ui.detectButton.emit("clicked(bool)", False)
    widget._timer.fire()
    widget.ui.cancelButton.emit("clicked(bool)", False)
    gui.pump(widget, limit_s=5)
    assert widget.ui.statusLabel.text.startswith("Cancelled")
    assert widget.ui.detectButton.enabled and not widget.ui.cancelButton.enabled
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 0


def test_in_slicer_test_class_passes_method_by_method_after_clear(slicer_gui):
    """ctest runs each test method alone, alphabetically, after ``mrmlScene.Clear()``; the
    widget test must not need the module to have been shown before."""
    scene, module, recorded = slicer_gui
    parent = gui.Parent()
    widget = module.CMBDetectorWidget(parent)
    recorded.widget = widget
    widget.setup()  # created but never entered, as under ctest
    names = sorted(n for n in dir(module.CMBDetectorTest) if n.startswith("test_"))
    assert "test_widget_names" in names and len(names) >= 6
    for name in names:
        case = module.CMBDetectorTest(name)
        case.setUp()
        getattr(case, name)()
    module.CMBDetectorTest().runTest()


def test_loading_and_entering_the_module_imports_no_torch_and_installs_nothing():
    """In a fresh process (as Slicer at start-up): import the module, create and enter the
    panel; torch stays out of the process (a child reports the device) and pip is not run."""
    import subprocess
    from pathlib import Path

    code = (
        "import sys, pytest; sys.path[:0] = sys.argv[1:3]\n"
        "import fake_slicer_gui as gui\n"
        "from slicer_scene_helpers import make_app\n"
        "mp = pytest.MonkeyPatch(); scene = make_app()[0]\n"
        "module, rec = gui.install(scene, mp)\n"
        "w = gui.make_widget(module, rec); gui.pump(w)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not rec.pip_calls and not rec.confirms, rec.pip_calls\n"
        "assert w.ui.deviceInfoLabel.text.startswith('torch '), w.ui.deviceInfoLabel.text\n"
        "print('ok')\n")
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-1500:]
