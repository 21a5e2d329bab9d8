"""Everything the CMB Detector panel does, without Qt: the widget only builds widgets, forwards
signals here and draws what this controller says.

The controller reads and writes a *parameters* object (in Slicer the module's
``parameterNodeWrapper`` instance; in tests any object with the same attributes: inputVolume,
modality, mask, threshold, device, thresholdFromModels, outputDirectory, excludeRejected,
exportSegmentation) and calls back a *view* (``progress(stage, fraction)``, ``status(text)``,
``error(text)``, ``refresh()``). It owns the run state: one detection at a time in a worker
process, polled without blocking (a Qt timer calls :meth:`poll`), inputs locked while it runs,
its result published on the volume it was started on, and Cancel killing the worker's process
tree. Results belong to volume *nodes*: the logic forgets them when the volume is removed or the
scene is closed, so a new scan that gets a recycled node ID never shows the old lesions.
"""
from __future__ import annotations

import os

from ..errors import Cancelled, CMBError, InputError

MODALITY_LABELS = ("SWI", "T2*-GRE", "QSM")
MODALITY_BY_ENGINE = {"swi": "SWI", "gre": "T2*-GRE", "qsm": "QSM"}
ENGINE_BY_MODALITY = {label: engine for engine, label in MODALITY_BY_ENGINE.items()}

#: controls that must not change while a run is going (the run uses their values)
INPUT_CONTROLS = ("inputVolumeSelector", "modalityComboBox", "maskSelector", "deviceComboBox",
                  "thresholdSlider")
#: controls that act on the current results
REVIEW_CONTROLS = ("acceptButton", "rejectButton", "unreviewButton", "exportButton",
                   "showSegmentationButton", "reportButton", "addLesionPlaceWidget")
#: the slider's step: a threshold this close to the models' value still "follows" the modality
THRESHOLD_STEP = 5e-3


class NullView:
    """A view that shows nothing (scripts); tests record the calls instead."""

    def progress(self, stage: str, fraction: float) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def error(self, text: str) -> None:
        pass

    def refresh(self) -> None:
        pass


def model_threshold(modality_label: str, models_dir=None):
    """The bundled models' validated threshold for a GUI modality label (no torch import), or
    None when there are no weights."""
    try:
        from ..engine.models import default_threshold, read_manifest

        return default_threshold(ENGINE_BY_MODALITY[modality_label], read_manifest(models_dir))
    except Exception:  # no weights yet: keep the slider; Detect will explain
        return None


def safe_file_stem(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or "volume"))
    return keep.strip("._") or "volume"


class PanelController:
    """The panel's behaviour. ``logic`` is a :class:`CMBDetectorLib.slicer_module.logic.CMBDetectorLogic`.

    ``python`` / ``detectorSpec`` choose the worker's interpreter and a stand-in detector
    (tests); by default ``PythonSlicer`` and the engine with the bundled weights.
    """

    def __init__(self, logic, view=None, python=None, detectorSpec=None):
        self.logic = logic
        self.view = view or NullView()
        self.python = python
        self.detectorSpec = detectorSpec
        self.params = None
        self.run = None            # the DetectionRun in progress
        self.deviceInfo = None     # what the worker's torch sees (asked lazily)
        self.lastDevice = ""       # "Last run: ..." text
        self._probe = None
        self._volume = None        # volume the panel last showed
        self._thresholdModality = None
        self._appliedThreshold = None
        self._observer = None
        #: ``importlib.util.find_spec`` stand-in (tests simulate a stock Slicer with it)
        self.findSpec = None
        self._observeScene()

    # --- parameters --------------------------------------------------------------------------
    def setParameters(self, params) -> None:
        """Attach the parameter object (None detaches, e.g. while the scene closes)."""
        self.params = params
        self._volume = None
        self._appliedThreshold = None
        if params is None:
            return
        if not params.thresholdFromModels:
            # Start at the operating point the models were validated at for this modality,
            # once per parameter node, so a reviewer's own threshold survives save/load.
            t = model_threshold(params.modality, self.logic.modelsDirectory)
            if t is not None:
                params.threshold = t
            params.thresholdFromModels = True
        self._thresholdModality = params.modality
        if params.inputVolume is None:
            node = self._firstScan()
            if node is not None:
                params.inputVolume = node
        self.parametersModified()

    def _firstScan(self):
        scene = self.logic.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None

    def parametersModified(self) -> None:
        """React to any change of the parameters (the widget forwards every ModifiedEvent)."""
        p = self.params
        if p is None:
            return
        if p.inputVolume is not self._volume:
            self._volume = p.inputVolume
            self._appliedThreshold = None
            self._noteProjection()
            self._guessModality()
        self._followModalityThreshold()
        self._applyThreshold()
        self.view.refresh()

    def _noteProjection(self) -> None:
        """Say so when the new input is a minimum-intensity projection: with the voxels of one
        (slab, and whether Detect reverses it; a series exported as "SWI" may be its mIP;
        about 0.1 s), or else named as one."""
        from ..engine.naming import MIN_IP_NOTE, looks_like_projection
        from ..engine.projection import find_projection
        from ..errors import CMBError
        from . import mrml

        node = self.params.inputVolume
        if node is None or self.running:
            return
        try:
            found = find_projection(mrml.volume_from_node(node))
        except CMBError:  # not a scalar volume: Detect reports it
            found = None
        if found is not None:  # the voxels say more than the name: slab, and the reversal
            from ..engine.settings import DetectionSettings

            self.view.status(found.note(
                across=False, reversed_=found.reversible and DetectionSettings.reverse_projection))
        elif looks_like_projection(node.GetName(), mrml.series_description(node)):
            self.view.status(MIN_IP_NOTE)

    def _guessModality(self) -> None:
        from ..engine.naming import guess_modality
        from . import mrml

        node = self.params.inputVolume
        if node is None or self.running:
            return
        guess = guess_modality(node.GetName(), mrml.series_description(node))
        if guess and self.params.modality != MODALITY_BY_ENGINE[guess]:
            self.params.modality = MODALITY_BY_ENGINE[guess]  # re-enters parametersModified

    def _followModalityThreshold(self) -> None:
        """When the modality changes and the slider still shows the previous modality's
        validated threshold, move it to the new one's (a reviewer's own value stays)."""
        p = self.params
        if p.modality == self._thresholdModality:
            return
        models = self.logic.modelsDirectory
        old = model_threshold(self._thresholdModality, models)
        new = model_threshold(p.modality, models)
        self._thresholdModality = p.modality
        if old is not None and new is not None and abs(p.threshold - old) < THRESHOLD_STEP:
            p.threshold = new

    def _applyThreshold(self) -> None:
        """Re-filter the current volume's stored candidates when the threshold moved."""
        p = self.params
        if self.running or not self.logic.hasResult(p.inputVolume):
            return
        if self._appliedThreshold is not None and abs(p.threshold - self._appliedThreshold) < 1e-9:
            return
        self._appliedThreshold = p.threshold
        self.logic.setThreshold(p.inputVolume, p.threshold)

    # --- what the view shows -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.run is not None

    @property
    def volume(self):
        return self.params.inputVolume if self.params is not None else None

    def resultNodes(self) -> dict:
        vol = self.volume
        return self.logic.resultNodes(vol) if vol is not None and not self.running else {}

    def hasResults(self) -> bool:
        return self.resultNodes().get("fiducial") is not None

    def canDetect(self) -> tuple:
        """``(enabled, tooltip)`` of the Detect button."""
        if self.running:
            return False, "Detection is running"
        if self.volume is None:
            return False, "Select an input volume"
        return True, "Detect microbleeds"

    def enabledControls(self) -> dict:
        """Control name (as in the .ui) -> enabled."""
        out = {name: not self.running for name in INPUT_CONTROLS}
        out["detectButton"] = self.canDetect()[0]
        out["cancelButton"] = self.running
        results = self.hasResults()
        out.update({name: results for name in REVIEW_CONTROLS})
        return out

    def lesionCountText(self) -> str:
        fid = self.resultNodes().get("fiducial")
        return str(fid.GetNumberOfControlPoints()) if fid is not None else "-"

    def locationLines(self) -> list:
        vol = self.volume
        return self.logic.locationSummary(vol) if vol is not None else []

    def deviceText(self) -> str:
        info = self.deviceInfo
        if info is None:
            text = "checking PyTorch..." if self._probe is not None else ""
        elif isinstance(info, str):
            text = info
        elif not info["installed"]:
            text = "PyTorch not installed (asked at Detect)"
        elif info["cuda"]:
            text = f"torch {info['version']}, GPU: {info['gpu']}"
        else:
            text = f"torch {info['version']}, CPU only"
        return "; ".join(t for t in (text, self.lastDevice) if t)

    # --- device facts, asked of a child Python --------------------------------------------------
    def probeDevice(self) -> None:
        """Ask a worker what torch sees (version, CUDA, GPU); answered through :meth:`poll`.
        Slicer's own process never imports torch or initialises CUDA."""
        if self._probe is not None or self.deviceInfo is not None:
            return
        from .logic import worker_python
        from .process import WorkerRun

        try:
            self._probe = WorkerRun([self.python or worker_python(), "-m",
                                     "CMBDetectorLib.slicer_module.worker", "--probe-device"])
        except OSError as exc:
            self.deviceInfo = f"cannot start Python: {exc}"

    def _pollProbe(self) -> None:
        if self._probe is None or not self._probe.poll():
            return
        from .logic import parse_device_probe

        try:
            self.deviceInfo = parse_device_probe(self._probe.tail)
        except CMBError as exc:
            self.deviceInfo = f"torch fails to load: {exc}"
        self._probe = None
        self.view.refresh()

    # --- detection -----------------------------------------------------------------------------
    def detect(self, confirm=None, pipInstall=None, installTorch=None, testing=False,
               location=True) -> bool:
        """Check dependencies (one question), then start the worker. True when started.

        Every failure (a declined or failed installation, bad input) ends in ``view.status``
        and ``view.error`` with one line; nothing is raised to the widget."""
        from .dependencies import ensure

        if self.running or self.params is None:
            return False
        p = self.params
        try:
            decision = ensure(confirm or (lambda q: False), pipInstall, installTorch,
                              location=location, find_spec=self.findSpec, testing=testing)
            if not decision.run:
                self.view.status(decision.message)
                return False
            if decision.message:
                self.view.status(decision.message)
            self.run = self.logic.startInSubprocess(
                p.inputVolume, p.modality, maskNode=p.mask, threshold=p.threshold,
                device=p.device, progress=self.view.progress, python=self.python,
                detectorSpec=self.detectorSpec, locate=decision.locate)
        except CMBError as exc:
            self._fail(str(exc))
            return False
        self.view.progress("starting", 0.0)
        self.view.refresh()
        return True

    def poll(self) -> bool:
        """Called by a timer: relay progress; publish when done. True while work is pending."""
        self._pollProbe()
        run = self.run
        if run is None:
            return self._probe is not None
        if not run.poll():
            return True
        self.run = None
        try:
            nodes = self.logic.finishRun(run)
        except Cancelled:
            self.view.progress("cancelled", 0.0)
            self.view.status("Cancelled; nothing was changed.")
        except CMBError as exc:
            self._fail(str(exc))
        else:
            self._finished(run, nodes)
        finally:
            run.cleanup()
            self.view.refresh()
        return self._probe is not None

    def _finished(self, run, nodes) -> None:
        result = self.logic.results[run.volumeNode.GetID()]
        self._appliedThreshold = self.params.threshold if self.params is not None else None
        name = f" ({result.device_name})" if result.device_name else ""
        self.lastDevice = f"last run on {result.device or 'unknown device'}{name}"
        text = f"Done: {len(nodes['lesions'])} lesion(s)."
        notes = list(dict.fromkeys(list(result.warnings) + list(run.worker.warnings)))
        if notes:
            text += " Warning: " + " ".join(notes)
        self.view.progress("done", 1.0)
        self.view.status(text)

    def _fail(self, message: str) -> None:
        self.view.progress("failed", 0.0)
        self.view.status(message)
        self.view.error(message)

    def cancel(self) -> None:
        """Kill the worker's whole process tree; the scene stays as it was."""
        run, self.run = self.run, None
        if run is None:
            return
        run.cancel()
        self.view.progress("cancelled", 0.0)  # the status line last: it stays visible
        self.view.status("Cancelled; nothing was changed.")
        self.view.refresh()

    # --- scene -----------------------------------------------------------------------------
    def _observeScene(self) -> None:
        import weakref

        ref = weakref.ref(self)  # no scene -> callback -> controller cycle (see the logic)

        def onClose(caller, event):
            controller = ref()
            if controller is not None:
                controller.sceneClosing()

        scene = self.logic.scene
        self._observer = (scene, scene.AddObserver(scene.StartCloseEvent, onClose))

    def sceneClosing(self) -> None:
        """File > Close Scene: stop the run, detach the parameters (the logic forgets the
        results on its own)."""
        self.cancel()
        self.setParameters(None)

    def cleanup(self) -> None:
        self.cancel()
        if self._probe is not None:
            self._probe.kill()
            self._probe = None
        if self._observer is not None:
            scene, tag = self._observer
            scene.RemoveObserver(tag)
            self._observer = None

    # --- review ----------------------------------------------------------------------------
    def _reviewable(self):
        if self.running:
            raise InputError("detection is running; wait or cancel it")
        if not self.hasResults():
            raise InputError("no detection result for this volume yet; press Detect first")
        return self.volume

    def setStatus(self, rows, status: str) -> None:
        vol = self._reviewable()
        for row in rows:
            self.logic.setStatus(vol, row, status)
        self.view.refresh()

    def pointPlaced(self) -> None:
        """A reviewer placed a missed lesion by hand: it joins the table as ``added``."""
        if self.volume is not None and not self.running:
            self.logic.syncTable(self.volume)
            self.view.refresh()

    def showSegmentation(self):
        vol = self._reviewable()
        return self.logic.showSegmentation(vol, self.params.excludeRejected)

    def export(self) -> dict:
        vol, p = self._reviewable(), self.params
        paths = self.logic.export(vol, str(p.outputDirectory), excludeRejected=p.excludeRejected,
                                  segmentation=p.exportSegmentation)
        self.view.status("Wrote: " + ", ".join(os.path.basename(v) for v in paths.values()))
        return paths

    def report(self) -> str:
        """The HTML report; location comes from the worker's registration (never computed on
        the GUI thread)."""
        vol = self._reviewable()
        path = os.path.join(str(self.params.outputDirectory),
                            f"{safe_file_stem(vol.GetName())}_report.html")
        path = self.logic.exportReport(vol, path, registerIfMissing=False)
        self.view.status(f"Wrote: {path}")
        self.view.refresh()
        return path


class PanelParameters:
    """Plain stand-in for the module's parameter node (scripts, tests): same attributes."""

    def __init__(self, **values):
        from pathlib import Path

        self.inputVolume = None
        self.modality = "SWI"
        self.mask = None
        self.threshold = 0.5
        self.device = "Auto"
        self.outputDirectory = Path.home()
        self.excludeRejected = False
        self.exportSegmentation = True
        self.thresholdFromModels = False
        for key, value in values.items():
            if not hasattr(self, key):
                raise AttributeError(key)
            setattr(self, key, value)
