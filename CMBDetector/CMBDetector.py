"""CMB Detector: 3D Slicer module that finds cerebral microbleeds on SWI, T2*-GRE or QSM.

Thin on purpose: module metadata, the widget and the in-Slicer test. All logic lives in
``CMBDetectorLib`` (``logic.py``, ``mrml.py``), which imports no Qt and is tested headless on
slicer-core. Nothing is installed at import time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from CMBDetectorLib.slicer_module.panel import MODALITY_LABELS, PanelController

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
DEMO_FILE = "CMBDemo_SWI.nii.gz"
#: sha256 of the bundled demo scan, checked by SampleData when loading (``Testing/test_ui.py``
#: fails when the file and this value disagree; None would mean: not bundled, not registered).
DEMO_SHA256 = "00a4370cd341fc3d8e19dd905ab874c8e18fe0d3f3009db25b375f2189a4f31b"
CONTRIBUTORS = ["CMBDetector maintainers (CMBDetector project)"]
POLL_MS = 100


#
# Module
#
class CMBDetector(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CMB Detector")
        # Slicer's shared category, translated in its own context (not a second category)
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []  # PyTorch is an extension dependency (EXTENSION_DEPENDS)
        self.parent.contributors = CONTRIBUTORS
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
# Widget: builds widgets and forwards signals; behaviour lives in CMBDetectorLib.slicer_module.panel
#
class CMBDetectorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedFiducial = None
        self._timer = None

    # --- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CMBDetector.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CMBDetectorLogic()
        self.controller = PanelController(self.logic.core, view=self)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.controller.cancel)
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

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self.controller is not None:
            self.controller.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.controller.probeDevice()  # a child Python answers; polled by the timer
        self._timer.start()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)  # the controller cancels and forgets on its own

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.onParameterNodeModified)
        self.controller.setParameters(self._parameterNode)
        self.refresh()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.controller.parametersModified()

    # --- the view the controller drives -------------------------------------------------------
    def progress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.progressBar.setFormat(f"{stage} %p%")
        self.ui.statusLabel.text = stage

    def status(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def error(self, text: str) -> None:
        slicer.util.errorDisplay(text, windowTitle=_("CMB Detector"))

    def refresh(self) -> None:
        c = self.controller
        for name, enabled in c.enabledControls().items():
            getattr(self.ui, name).enabled = enabled
        self.ui.detectButton.toolTip = c.canDetect()[1]
        nodes = c.resultNodes()
        fid = nodes.get("fiducial")
        self.ui.resultsTableView.setMRMLTableNode(nodes.get("table"))
        self.ui.addLesionPlaceWidget.setCurrentNode(fid)
        self.ui.lesionCountLabel.text = c.lesionCountText()
        self.ui.locationSummaryLabel.text = "\n".join(c.locationLines())
        self.ui.deviceInfoLabel.text = c.deviceText()
        self._observeFiducial(fid)

    def _observeFiducial(self, fid) -> None:
        if self._observedFiducial is fid:
            return
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        if self._observedFiducial is not None:
            self.removeObserver(self._observedFiducial, event, self.onPointPlaced)
        if fid is not None:
            self.addObserver(fid, event, self.onPointPlaced)
        self._observedFiducial = fid

    # --- forwarded signals ------------------------------------------------------------------
    def onPoll(self) -> None:
        if not self.controller.poll():  # nothing running: no more polling until needed
            self._timer.stop()

    def onDetect(self) -> None:
        started = self.controller.detect(
            confirm=lambda q: slicer.util.confirmOkCancelDisplay(q, windowTitle=_("CMB Detector")),
            pipInstall=slicer.util.pip_install, testing=slicer.app.testingEnabled())
        if started:
            self._timer.start()

    def onPointPlaced(self, caller, event) -> None:
        self.controller.pointPlaced()

    def _selectedRows(self) -> list:
        return sorted({i.row() for i in self.ui.resultsTableView.selectionModel().selectedIndexes()})

    def onRowClicked(self, index) -> None:
        fid = self.controller.resultNodes().get("fiducial")
        if fid is not None and 0 <= index.row() < fid.GetNumberOfControlPoints():
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(fid.GetID(), index.row(),
                                                                        True)

    def onSetStatus(self, status: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not set the review status."),
                                             waitCursor=False):
            self.controller.setStatus(self._selectedRows(), status)

    def onShowSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not create the segmentation."),
                                             waitCursor=True):
            self.controller.showSegmentation()

    def onReport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Report failed."), waitCursor=True):
            self.controller.report()

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            self.controller.export()


#
# Logic: a thin Slicer wrapper around the headless CMBDetectorLib.slicer_module.logic.CMBDetectorLogic
#
class CMBDetectorLogic(ScriptedLoadableModuleLogic):
    """``process(inputVolumeNode, modality, ...)`` and friends, usable without the widget.

    Delegates to :class:`CMBDetectorLib.slicer_module.logic.CMBDetectorLogic` on ``slicer.mrmlScene``; see
    that class for the full API (setThreshold, setStatus, syncTable, export, showSegmentation).
    """

    def __init__(self, detector=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from CMBDetectorLib.slicer_module.logic import CMBDetectorLogic as HeadlessLogic

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
    """The scenarios of ``CMBDetectorLib.slicer_module.selftest`` inside Slicer (stand-in detector).

    ctest runs each ``test_*`` method on its own, alphabetically, after ``mrmlScene.Clear()``;
    ``runTest`` does the same, so no method depends on another or on the module being shown.
    The same scenarios run headless on slicer-core in ``Testing/slicer_module/test_selftest.py``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for name in sorted(n for n in dir(self) if n.startswith("test_")):
            self.setUp()
            self.delayDisplay(name)
            getattr(self, name)()
        self.delayDisplay("Test passed")

    def test_bad_input(self):
        from CMBDetectorLib.slicer_module import selftest
        selftest.bad_input(slicer.mrmlScene)

    def test_cancel_kills_the_worker(self):
        from CMBDetectorLib.slicer_module import selftest
        selftest.cancel_kills_the_worker(slicer.mrmlScene)

    def test_detect_review_export(self):
        from CMBDetectorLib.slicer_module import selftest
        selftest.detect_review_export(slicer.mrmlScene)

    def test_no_stale_results_after_close(self):
        from CMBDetectorLib.slicer_module import selftest
        selftest.no_stale_results_after_close(slicer.mrmlScene)

    def test_threshold_follows_the_modality_until_moved(self):
        from CMBDetectorLib.slicer_module import selftest
        selftest.threshold_follows_the_modality_until_moved(slicer.mrmlScene)

    def test_widget_names(self):
        """The panel as a user opens it (works whether or not the module was shown before)."""
        from CMBDetectorLib.slicer_module import selftest
        from CMBDetectorLib.slicer_module.panel import INPUT_CONTROLS, REVIEW_CONTROLS

        slicer.util.selectModule("CMBDetector")
        widget = slicer.modules.cmbdetector.widgetRepresentation().self()
        for name in INPUT_CONTROLS + REVIEW_CONTROLS + ("detectButton", "cancelButton",
                                                         "progressBar", "resultsTableView"):
            self.assertTrue(hasattr(widget.ui, name), name)
        widget.ui.inputVolumeSelector.setCurrentNode(None)
        node, _truth = selftest.add_scan(slicer.mrmlScene, name="7: T2star hemo")
        widget.ui.inputVolumeSelector.setCurrentNode(node)
        self.assertEqual(widget._parameterNode.modality, "T2*-GRE")
