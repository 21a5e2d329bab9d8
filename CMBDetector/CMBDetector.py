"""CMB Detector: 3D Slicer module that finds cerebral microbleeds on SWI, T2*-GRE or QSM.

Thin on purpose: module metadata, the widget and the in-Slicer test. All logic lives in
``CMBDetectorLib`` (``logic.py``, ``mrml.py``), which imports no Qt and is tested headless on
slicer-core. Nothing is installed at import time.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
DEMO_FILE = "CMBDemo_SWI.nii.gz"
#: sha256 of the bundled demo scan, checked by SampleData when loading (``Testing/test_ui.py``
#: fails when the file and this value disagree; None would mean: not bundled, not registered).
DEMO_SHA256 = "00a4370cd341fc3d8e19dd905ab874c8e18fe0d3f3009db25b375f2189a4f31b"
MODALITY_LABELS = ("SWI", "T2*-GRE", "QSM")
MODALITY_BY_ENGINE = {"swi": "SWI", "gre": "T2*-GRE", "qsm": "QSM"}
ENGINE_BY_MODALITY = {label: engine for engine, label in MODALITY_BY_ENGINE.items()}


#
# Module
#
class CMBDetector(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMB Detector")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []  # PyTorch is an extension dependency (EXTENSION_DEPENDS)
        self.parent.contributors = ["CMBDetector contributors"]
        self.parent.helpText = _(
            "Detects cerebral microbleeds (CMBs) on one 3D brain scan: susceptibility-weighted "
            "imaging (SWI), T2*-weighted gradient echo (T2*-GRE) or quantitative susceptibility "
            "mapping (QSM). Select the scan and its modality, press Detect, review the lesions "
            "(accept, reject, add missed ones) and export the fiducials, the table and the "
            "lesion segmentation. The confidence slider re-filters the candidates instantly. "
            "<br><b>Not for diagnostic use.</b> The bundled models are trained on simulated "
            "lesions; results must be reviewed by a qualified reader. "
            "See the <a href=\"https://github.com/cmbdetector/SlicerCMBDetector\">project page</a>.")
        self.parent.acknowledgementText = _(
            "Method after Sundaresan V, Arthofer C, Zamboni G, et al. Automated detection of "
            "cerebral microbleeds on MR images using knowledge distillation framework. "
            "Front. Neuroinform. 2023;17:1204186. doi:10.3389/fninf.2023.1204186. "
            "Re-implemented from the paper; no code of the reference implementation is used.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the bundled demo SWI scan in the Sample Data module (a local file, no network)."""
    demo = SAMPLE_DIR / DEMO_FILE
    if not demo.exists() or not DEMO_SHA256:
        return
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="CMB Detector",
        sampleName="CMBDemo_SWI",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "CMBDetector.png"),
        uris=demo.as_uri(),
        fileNames=DEMO_FILE,
        checksums=f"SHA256:{DEMO_SHA256}",
        nodeNames="CMBDemo_SWI",
    )


#
# Parameter node
#
@parameterNodeWrapper
class CMBDetectorParameterNode:
    """GUI state, saved with the scene.

    inputVolume - scan to search (never modified).
    modality - SWI, T2*-GRE or QSM.
    mask - optional brain mask (segmentation or label map).
    threshold - minimum student confidence of a reported lesion (0-1).
    device - Auto (CUDA if it works), CPU or GPU.
    outputDirectory - export folder; excludeRejected / exportSegmentation - export options.
    thresholdFromModels - whether the threshold was initialised from the models' manifest (it
        then follows the modality's validated threshold until the reviewer moves it).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(list(MODALITY_LABELS))] = "SWI"
    mask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None] = None
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    device: Annotated[str, Choice(["Auto", "CPU", "GPU"])] = "Auto"
    outputDirectory: Path = Path.home()
    excludeRejected: bool = False
    exportSegmentation: bool = True
    thresholdFromModels: bool = False  # slider already set to the models' operating point


#
# Widget
#
class CMBDetectorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._busy = False
        self._observedFiducial = None
        self._torchChecked = False
        self._thresholdModality = None  # modality whose validated threshold the slider shows

    # --- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetector.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBDetectorLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.acceptButton.connect("clicked()", lambda: self.onSetStatus("accepted"))
        self.ui.rejectButton.connect("clicked()", lambda: self.onSetStatus("rejected"))
        self.ui.unreviewButton.connect("clicked()", lambda: self.onSetStatus("unreviewed"))
        self.ui.showSegmentationButton.connect("clicked(bool)", self.onShowSegmentation)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.reportButton.connect("clicked(bool)", self.onReport)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onRowClicked)
        self.ui.resultsTableView.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.resultsTableView.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.progressBar.setValue(0)
        # one point per click: the reviewer adds a missed lesion, then goes on reviewing
        self.ui.addLesionPlaceWidget.placeMultipleMarkups = \
            slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        self.initializeParameterNode()
        self.updateResultsView()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._torchChecked:  # after the panel is drawn: importing torch takes seconds
            qt.QTimer.singleShot(0, self.updateDeviceInfo)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.thresholdFromModels:
            # Start the slider at the operating point the bundled models were validated at
            # for this modality (read from the manifest; no torch import). Once per parameter
            # node, so a reviewer's own threshold survives scene save/load.
            t = self._modelThreshold(self._parameterNode.modality)
            if t is not None:
                self._parameterNode.threshold = t
            self._parameterNode.thresholdFromModels = True
        self._thresholdModality = self._parameterNode.modality
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node and not node.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = node

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._thresholdModality = self._parameterNode.modality
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.onParameterNodeModified)
            self._checkCanApply()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._followModalityThreshold()
        self._checkCanApply()

    @staticmethod
    def _modelThreshold(modality: str):
        """The models' validated threshold for a modality label, or None without weights."""
        try:
            from CMBDetectorLib.models import default_threshold, read_manifest
            return default_threshold(ENGINE_BY_MODALITY[modality], read_manifest())
        except Exception:  # no weights yet: keep the slider; Detect will explain
            return None

    def _followModalityThreshold(self) -> None:
        """When the modality changes and the slider still shows the previous modality's
        validated threshold, move it to the new modality's (a reviewer's own value stays)."""
        p = self._parameterNode
        if p is None or p.modality == self._thresholdModality:
            return
        old, new = self._modelThreshold(self._thresholdModality), self._modelThreshold(p.modality)
        self._thresholdModality = p.modality
        if old is not None and new is not None and abs(p.threshold - old) < 5e-3:  # slider step
            p.threshold = new

    def _checkCanApply(self, caller=None, event=None) -> None:
        ok = bool(self._parameterNode and self._parameterNode.inputVolume) and not self._busy
        self.ui.detectButton.enabled = ok
        self.ui.detectButton.toolTip = (_("Detect microbleeds") if ok
                                        else _("Select an input volume"))

    # --- device ----------------------------------------------------------------------------
    def updateDeviceInfo(self) -> None:
        self._torchChecked = True
        from CMBDetectorLib.logic import torch_info

        try:
            info = torch_info()
        except Exception as exc:  # a broken torch install must not break the panel
            self.ui.deviceInfoLabel.text = _("torch fails to load: {err}").format(err=exc)
            return
        if not info["installed"]:
            self.ui.deviceInfoLabel.text = _("PyTorch not installed (asked at Detect)")
        elif info["cuda"]:
            self.ui.deviceInfoLabel.text = f"torch {info['version']}, GPU: {info['gpu']}"
        else:
            self.ui.deviceInfoLabel.text = f"torch {info['version']}, CPU only"

    def ensureDependencies(self) -> bool:
        """Ask once, then install PyTorch (and scipy) when missing. False when declined."""
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if not missing:
            return True
        if slicer.app.testingEnabled():
            raise RuntimeError(f"missing Python packages in testing mode: {missing}")
        if not slicer.util.confirmOkCancelDisplay(
                _("CMB Detector needs {pkgs}, not installed in this Slicer. Install now? "
                  "This downloads several hundred MB and can take minutes.")
                .format(pkgs=" and ".join(missing)), windowTitle=_("CMB Detector")):
            self.ui.statusLabel.text = _(
                "Not started: PyTorch is required. Install the PyTorch extension from the "
                "Extensions Manager, or press Detect again and accept the installation.")
            return False
        with slicer.util.WaitCursor():
            if "torch" in missing:
                try:
                    import PyTorchUtils  # the PyTorch extension picks the right CUDA build

                    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) \
                            is None:
                        raise RuntimeError("PyTorch installation failed")
                except ModuleNotFoundError:
                    self._pipEnsure(["torch>=2.1"])
            if "scipy" in missing:
                self._pipEnsure(["scipy>=1.8"])
        self._torchChecked = False
        self.updateDeviceInfo()
        return True

    @staticmethod
    def _pipEnsure(requirements) -> None:
        pydeps = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
        if pydeps is not None and hasattr(pydeps, "pip_ensure"):
            from packaging.requirements import Requirement

            pydeps.pip_ensure([Requirement(r) for r in requirements], requester="CMBDetector")
        else:
            slicer.util.pip_install(" ".join(requirements))

    # --- detection -------------------------------------------------------------------------
    def onInputChanged(self, node) -> None:
        if node is not None and self._parameterNode is not None:
            from CMBDetectorLib import mrml

            guess = mrml.guess_modality(node.GetName(), mrml.series_description(node))
            if guess:
                self._parameterNode.modality = MODALITY_BY_ENGINE[guess]
        self.updateResultsView()

    def onDetect(self) -> None:
        from CMBDetectorLib.errors import Cancelled, CMBError

        p = self._parameterNode
        if not self.ensureDependencies():
            return
        self._busy = True
        self._cancelRequested = False
        self._checkCanApply()
        self.ui.cancelButton.enabled = True
        self.ui.progressBar.setValue(0)
        try:
            nodes = self.logic.processInSubprocess(
                p.inputVolume, p.modality, maskNode=p.mask, threshold=p.threshold,
                device=p.device, progress=self.onProgress,
                cancel=lambda: self._cancelRequested, idle=slicer.app.processEvents)
            self.ui.statusLabel.text = _("Done: {n} lesion(s).").format(n=len(nodes["lesions"]))
            self.ui.progressBar.setValue(100)
            self.onProgress(_("locating lesions (MNI registration)"), 1.0)
            slicer.app.processEvents()
            try:
                self.logic.locate(p.inputVolume)
            except CMBError as exc:  # location is optional: detection results stay
                self.ui.locationSummaryLabel.text = _("Location unavailable: {err}").format(
                    err=exc)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            self.ui.progressBar.setValue(0)
        except CMBError as exc:
            self.ui.statusLabel.text = str(exc)
            slicer.util.errorDisplay(str(exc), windowTitle=_("CMB Detector"))
        except Exception as exc:  # programming error: show it, log the traceback
            logging.exception("CMB detection failed")
            slicer.util.errorDisplay(_("Detection failed: {err}").format(err=exc),
                                     windowTitle=_("CMB Detector"))
        finally:
            self._busy = False
            self.ui.cancelButton.enabled = False
            self._checkCanApply()
            self.updateResultsView()

    def onProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.progressBar.setFormat(f"{stage} %p%")
        self.ui.statusLabel.text = stage

    def onCancel(self) -> None:
        self._cancelRequested = True

    # --- review ----------------------------------------------------------------------------
    def _nodes(self) -> dict:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        return self.logic.resultNodes(volume) if volume else {}

    def updateResultsView(self) -> None:
        nodes = self._nodes()
        fid, table = nodes.get("fiducial"), nodes.get("table")
        self.ui.resultsTableView.setMRMLTableNode(table)
        self.ui.addLesionPlaceWidget.setCurrentNode(fid)
        self.ui.addLesionPlaceWidget.enabled = fid is not None
        for button in (self.ui.acceptButton, self.ui.rejectButton, self.ui.unreviewButton,
                       self.ui.exportButton, self.ui.showSegmentationButton):
            button.enabled = fid is not None
        self.ui.lesionCountLabel.text = (str(fid.GetNumberOfControlPoints()) if fid is not None
                                         else "-")
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        lines = self.logic.locationSummary(volume) if volume is not None else []
        if lines or fid is None:
            self.ui.locationSummaryLabel.text = "\n".join(lines)
        self.ui.reportButton.enabled = fid is not None
        if self._observedFiducial is not fid:
            if self._observedFiducial is not None:
                self.removeObserver(self._observedFiducial,
                                    slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                    self.onPointPlaced)
            if fid is not None:
                self.addObserver(fid, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                 self.onPointPlaced)
            self._observedFiducial = fid

    def onThresholdChanged(self, value: float) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None or volume.GetID() not in self.logic.results:
            return
        self.ui.lesionCountLabel.text = str(self.logic.setThreshold(volume, value))

    def onPointPlaced(self, caller, event) -> None:
        volume = self._parameterNode.inputVolume
        if volume is not None:
            self.logic.syncTable(volume)
            self.updateResultsView()

    def _selectedRows(self) -> list:
        rows = {i.row() for i in self.ui.resultsTableView.selectionModel().selectedIndexes()}
        return sorted(rows)

    def onRowClicked(self, index) -> None:
        fid = self._nodes().get("fiducial")
        if fid is None or not 0 <= index.row() < fid.GetNumberOfControlPoints():
            return
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.JumpSlicesToNthPointInMarkup(fid.GetID(), index.row(), True)

    def onSetStatus(self, status: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not set the review status."),
                                             waitCursor=False):
            for row in self._selectedRows():
                self.logic.setStatus(self._parameterNode.inputVolume, row, status)
            self.updateResultsView()

    def onShowSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not create the segmentation."),
                                             waitCursor=True):
            self.logic.showSegmentation(self._parameterNode.inputVolume,
                                        self._parameterNode.excludeRejected)

    def onReport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Report failed."), waitCursor=True):
            name = "".join(c if c.isalnum() or c in "-_." else "_"
                           for c in p.inputVolume.GetName())
            path = self.logic.exportReport(p.inputVolume,
                                           os.path.join(str(p.outputDirectory),
                                                        f"{name}_report.html"))
            self.updateResultsView()
            self.ui.statusLabel.text = _("Wrote: {file}").format(file=path)

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            paths = self.logic.export(p.inputVolume, str(p.outputDirectory),
                                      excludeRejected=p.excludeRejected,
                                      segmentation=p.exportSegmentation)
            self.ui.statusLabel.text = _("Wrote: {files}").format(
                files=", ".join(os.path.basename(v) for v in paths.values()))


#
# Logic: a thin Slicer wrapper around the headless CMBDetectorLib.logic.CMBDetectorLogic
#
class CMBDetectorLogic(ScriptedLoadableModuleLogic):
    """``process(inputVolumeNode, modality, ...)`` and friends, usable without the widget.

    Delegates to :class:`CMBDetectorLib.logic.CMBDetectorLogic` on ``slicer.mrmlScene``; see
    that class for the full API (setThreshold, setStatus, syncTable, export, showSegmentation).
    """

    def __init__(self, detector=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from CMBDetectorLib.logic import CMBDetectorLogic as HeadlessLogic

        self.core = HeadlessLogic(scene=None, detector=detector)

    def getParameterNode(self):
        return CMBDetectorParameterNode(super().getParameterNode())

    def process(self, inputVolumeNode, modality, maskNode=None, threshold=None, device=None,
                progress=None, cancel=None, settings=None) -> dict:
        """Detect CMBs in ``inputVolumeNode`` (in this process) and show them in the scene.

        ``modality``: "SWI", "T2*-GRE" or "QSM" (or swi/gre/qsm). Returns the result nodes
        ``{"fiducial", "table", "lesions"}``. Usable from the Python console or
        ``Slicer --no-main-window --python-script``; the widget uses ``processInSubprocess``.
        """
        return self.core.process(inputVolumeNode, modality, maskNode=maskNode,
                                 settings=settings, threshold=threshold, device=device,
                                 progress=progress, cancel=cancel)

    def __getattr__(self, name):
        core = self.__dict__.get("core")
        if core is None:
            raise AttributeError(name)
        return getattr(core, name)


#
# Test (Reload and Test; ctest via slicer_add_python_unittest)
#
class CMBDetectorTest(ScriptedLoadableModuleTest):
    """Same scenario as Testing/test_logic_slicer.py, inside Slicer, with the stand-in detector."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detect_review_export()
        self.setUp()
        self.test_bad_input()
        self.setUp()
        self.test_widget_names()
        self.test_threshold_follows_the_modality_until_moved()

    def _scan(self):
        import numpy as np
        from CMBDetectorLib.standins import synthetic_scan

        arr, m, truth = synthetic_scan()
        node = slicer.util.addVolumeFromArray(arr, ijkToRAS=m, name="sub-01_swi")
        return node, np.array([t["centre_ras"] for t in truth])

    def test_detect_review_export(self):
        import tempfile

        import numpy as np
        from CMBDetectorLib import mrml
        from CMBDetectorLib.errors import Cancelled
        from CMBDetectorLib.standins import dark_blob_detector

        self.delayDisplay("Detect on an oblique, anisotropic scan under a transform")
        node, truth = self._scan()
        t = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        mat = vtk.vtkMatrix4x4()
        mat.SetElement(0, 3, 12.0)
        mat.SetElement(2, 3, -7.0)
        t.SetMatrixTransformToParent(mat)
        node.SetAndObserveTransformNodeID(t.GetID())
        truth = truth + np.array([12.0, 0.0, -7.0])
        logic = CMBDetectorLogic(detector=dark_blob_detector)
        nodes = logic.process(node, "SWI", threshold=0.3)
        fid = nodes["fiducial"]
        found = slicer.util.arrayFromMarkupsControlPoints(fid, world=True)
        self.assertEqual(len(found), len(truth))
        d = np.linalg.norm(truth[:, None] - found[None], axis=2).min(axis=1)
        self.assertLess(d.max(), 1.0)
        self.assertEqual(nodes["table"].GetNumberOfRows(), fid.GetNumberOfControlPoints())

        self.delayDisplay("Threshold, review, re-run, cancel")
        self.assertEqual(logic.setThreshold(node, 0.7), 2)
        logic.setStatus(node, 1, "rejected")
        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.process(node, "SWI", threshold=0.7)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.assertEqual(mrml.get_status(fid, 1), "rejected")
        with self.assertRaises(Cancelled):
            logic.process(node, "SWI", cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        self.delayDisplay("Export and re-import")
        with tempfile.TemporaryDirectory() as tmp:
            paths = logic.export(node, tmp)
            back = slicer.util.loadMarkups(paths["markups"])
            self.assertEqual(back.GetNumberOfControlPoints(), 2)
            self.assertEqual(mrml.get_status(back, 1), "rejected")
            table = slicer.util.loadTable(paths["csv"])
            self.assertEqual(table.GetNumberOfRows(), 2)
        self.delayDisplay("Test passed")

    def test_bad_input(self):
        import numpy as np
        from CMBDetectorLib.errors import InputError
        from CMBDetectorLib.standins import dark_blob_detector

        node = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32), np.float32), name="flat")
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError):
            CMBDetectorLogic(detector=dark_blob_detector).process(node, "SWI")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

    def test_widget_names(self):
        widget = slicer.modules.cmbdetector.widgetRepresentation().self()
        for name in ("inputVolumeSelector", "modalityComboBox", "maskSelector", "thresholdSlider",
                     "deviceComboBox", "detectButton", "cancelButton", "progressBar",
                     "resultsTableView", "acceptButton", "rejectButton", "exportButton"):
            self.assertTrue(hasattr(widget.ui, name), name)
        node, _truth = self._scan()
        node.SetName("7: T2star hemo")
        widget.ui.inputVolumeSelector.setCurrentNode(node)
        self.assertEqual(widget._parameterNode.modality, "T2*-GRE")

    def test_threshold_follows_the_modality_until_moved(self):
        from CMBDetectorLib.models import default_threshold, read_manifest

        manifest = read_manifest()
        p = slicer.modules.cmbdetector.widgetRepresentation().self()._parameterNode
        p.modality = "SWI"
        p.threshold = default_threshold("swi", manifest)
        p.modality = "QSM"
        self.assertAlmostEqual(p.threshold, default_threshold("qsm", manifest), places=2)
        p.threshold = 0.33  # the reviewer's own value stays
        p.modality = "T2*-GRE"
        self.assertAlmostEqual(p.threshold, 0.33, places=2)
