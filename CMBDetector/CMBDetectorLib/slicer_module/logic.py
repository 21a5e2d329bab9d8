"""Headless logic of the Slicer module: run detection on a volume node, show and review results.

Usable without the widget, from Slicer's Python console, ``Slicer --no-main-window
--python-script`` or plain Python with slicer-core::

    logic = CMBDetectorLogic()                    # scene = slicer.mrmlScene
    nodes = logic.process(volumeNode, "swi")      # fiducials "CMB detections" + lesion table
    logic.setThreshold(volumeNode, 0.8)           # re-filter stored candidates, no networks

The detector is injected (default: the engine's ``detection.detect``), like SlicerNNUnet injects
its process, so tests drive the full MRML path with a stand-in. Nothing here imports Qt; the
input volume is never modified, and nothing is added to the scene until detection succeeded
(errors and Cancel leave the scene as it was).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Callable

from .. import MODALITIES
from . import mrml
from ..errors import Cancelled, CMBError, InputError
from ..engine.settings import DetectionSettings
from .worker import engine_detect

_MODALITY_ALIASES = {"swi": "swi", "gre": "gre", "t2*-gre": "gre", "t2*": "gre", "t2star": "gre",
                     "t2*gre": "gre", "qsm": "qsm"}
DEVICE_ALIASES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


def normalise_modality(modality: str) -> str:
    """``"SWI"``, ``"T2*-GRE"``, ``"QSM"`` (GUI labels) or engine names -> engine name."""
    m = _MODALITY_ALIASES.get(str(modality).strip().lower())
    if m not in MODALITIES:
        raise InputError(f"modality must be SWI, T2*-GRE or QSM, got {modality!r}")
    return m


def torch_info(python: str | None = None) -> dict:
    """Installed torch version and the device ``auto`` would use, asked of a child Python so
    that this process (Slicer's) never imports torch or initialises CUDA."""
    from .process import WorkerRun

    run = WorkerRun([python or worker_python(), "-m", "CMBDetectorLib.slicer_module.worker",
                     "--probe-device"])
    run.wait()
    return parse_device_probe(run.tail)


def parse_device_probe(lines) -> dict:
    """The JSON a ``--probe-device`` worker printed (raises CMBError when absent)."""
    from .worker import DEVICE_TAG

    for line in lines:
        if line.startswith(DEVICE_TAG + "\t"):
            return json.loads(line.split("\t", 1)[1])
    raise CMBError("could not ask Python which device torch can use: "
                   + (" | ".join(lines[-3:]) or "no output"))


class CMBDetectorLogic:
    """Run detection on MRML volume nodes and manage the result nodes of each volume.

    Parameters
    ----------
    scene : vtkMRMLScene, optional
        Scene to work in; default ``slicer.mrmlScene``.
    detector : callable, optional
        ``detector(volume, modality, mask=, settings=, progress=, cancel=) -> DetectionResult``
        (``settings`` may be None); default :func:`engine_detect`, i.e. the engine's
        :func:`CMBDetectorLib.engine.detection.detect` with the bundled weights.
    """

    def __init__(self, scene=None, detector: Callable | None = None, modelsDirectory=None):
        self._scene = scene
        self.detector = detector
        #: weights folder for the default engine (None = bundled weights)
        self.modelsDirectory = modelsDirectory
        #: volume node ID -> DetectionResult (all candidates; the slider re-filters these)
        self.results: dict = {}
        #: volume node ID -> MNIRegistration (lesion location; registered once, then ms lookups)
        self.registrations: dict = {}
        #: volume node ID -> LocationResult of the current review state
        self.locations: dict = {}
        #: volume node ID -> why location is unavailable (shown instead of the summary)
        self.locationErrors: dict = {}
        self._observed = None
        self._observers: list = []

    @property
    def scene(self):
        scene = mrml._scene_of(self._scene)
        if scene is not self._observed:
            self._observe(scene)
        return scene

    # --- scene events: results belong to a volume *node*, not to a recyclable ID --------------
    def _observe(self, scene) -> None:
        """Forget a volume's results when it is removed or the scene is closed: after
        File > Close Scene the next volume gets the same ID, and must not inherit them.

        The callbacks hold the logic weakly: a scene -> callback -> logic -> scene cycle
        would be left to Python's garbage collector, which must not tear down VTK objects."""
        import weakref

        import vtk

        self.removeObservers()
        ref = weakref.ref(self)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def onNodeRemoved(caller, event, node):
            logic = ref()
            if logic is not None and node is not None:
                logic.forget(node.GetID())

        def onClose(caller, event):
            logic = ref()
            if logic is not None:
                logic.forgetAll()

        self._observers = [(scene, scene.AddObserver(scene.StartCloseEvent, onClose)),
                           (scene, scene.AddObserver(scene.NodeRemovedEvent, onNodeRemoved))]
        self._observed = scene

    def removeObservers(self) -> None:
        for obj, tag in self._observers:
            obj.RemoveObserver(tag)
        self._observers, self._observed = [], None

    def forget(self, volumeID: str) -> None:
        """Drop the stored result, registration and location of one volume (nodes stay)."""
        for store in (self.results, self.registrations, self.locations, self.locationErrors):
            store.pop(volumeID, None)

    def forgetAll(self) -> None:
        for store in (self.results, self.registrations, self.locations, self.locationErrors):
            store.clear()

    def hasResult(self, inputVolumeNode) -> bool:
        return inputVolumeNode is not None and inputVolumeNode.GetID() in self.results

    # --- running ---------------------------------------------------------------------------
    def prepare(self, inputVolumeNode, modality, maskNode=None):
        """Validate and copy the inputs (no scene change). Returns ``(volume, mask, modality)``."""
        modality = normalise_modality(modality)
        volume = mrml.volume_from_node(inputVolumeNode)
        mask = mrml.mask_from_node(maskNode, volume) if maskNode is not None else None
        return volume, mask, modality

    @staticmethod
    def makeSettings(settings=None) -> DetectionSettings | None:
        """A validated copy of ``settings`` (dataclass, dict or None -> None = engine default)."""
        if settings is None:
            return None
        if isinstance(settings, DetectionSettings):
            return DetectionSettings.from_dict(settings.to_dict())
        return DetectionSettings.from_dict(dict(settings))

    @staticmethod
    def normaliseDevice(device) -> str | None:
        if device is None:
            return None
        dev = DEVICE_ALIASES.get(str(device).strip().lower())
        if dev is None:
            raise InputError(f"device must be Auto, CPU or GPU, got {device!r}")
        return dev

    @staticmethod
    def _checkThreshold(threshold):
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {threshold}")

    def process(self, inputVolumeNode, modality, maskNode=None, settings=None, threshold=None,
                device=None, progress=None, cancel=None) -> dict:
        """Detect CMBs in ``inputVolumeNode`` and show them; returns the result nodes.

        Replaces this module's previous results for the same volume (review statuses of
        lesions found again are kept). Raises :class:`CMBError` subclasses for user problems
        (:class:`Cancelled` when ``cancel()`` returned True); the scene is then unchanged.
        """
        s, dev = self.makeSettings(settings), self.normaliseDevice(device)
        self._checkThreshold(threshold)
        volume, mask, modality = self.prepare(inputVolumeNode, modality, maskNode)
        if self.detector is None:
            result = engine_detect(volume, modality, mask=mask, settings=s, device=dev,
                                   progress=progress, cancel=cancel,
                                   models_dir=self.modelsDirectory)
        else:
            result = self.detector(volume, modality, mask=mask, settings=s, progress=progress,
                                   cancel=cancel)
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        return self.publish(inputVolumeNode, result, threshold)

    def processInSubprocess(self, inputVolumeNode, modality, maskNode=None, settings=None,
                            threshold=None, device=None, progress=None, cancel=None,
                            idle=None, python=None, detectorSpec=None, pollSeconds=0.05,
                            locate=False) -> dict:
        """Like :meth:`process`, but the engine runs in a child Python (``PythonSlicer``);
        blocks until done (scripts, tests). ``cancel()`` returning True kills the child's whole
        process tree. The panel uses :meth:`startInSubprocess` and polls instead."""
        run = self.startInSubprocess(inputVolumeNode, modality, maskNode=maskNode,
                                     settings=settings, threshold=threshold, device=device,
                                     progress=progress, python=python,
                                     detectorSpec=detectorSpec, locate=locate)
        try:
            run.worker.wait(cancel=cancel, idle=idle, pollSeconds=pollSeconds)
            return self.finishRun(run)
        finally:
            run.cleanup()

    def startInSubprocess(self, inputVolumeNode, modality, maskNode=None, settings=None,
                          threshold=None, device=None, progress=None, python=None,
                          detectorSpec=None, locate=False) -> "DetectionRun":
        """Validate, write the inputs and start the worker; returns at once.

        Poll the returned :class:`DetectionRun`; when it has ended, :meth:`finishRun`
        publishes its result on *this* volume (whatever is selected by then)."""
        s, dev = self.makeSettings(settings), self.normaliseDevice(device)
        self._checkThreshold(threshold)
        volume, mask, modality = self.prepare(inputVolumeNode, modality, maskNode)
        work = tempfile.mkdtemp(prefix="CMBDetector-")
        try:
            cmd = _worker_command(work, volume, mask, modality, s, dev, self.modelsDirectory,
                                  detectorSpec, locate, python)
            from .process import WorkerRun

            worker = WorkerRun(cmd, progress=progress)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return DetectionRun(inputVolumeNode, worker, work, threshold, locate)

    def finishRun(self, run: "DetectionRun") -> dict:
        """Publish a finished run's result (and registration) on the volume it was run on.

        Raises what the worker reported (:class:`Cancelled`, :class:`CMBError`), or
        :class:`InputError` when that volume left the scene during the run."""
        run.worker.check()
        node = run.volumeNode
        if node.GetScene() is None or self.scene.GetNodeByID(node.GetID()) is not node:
            raise InputError(f"{node.GetName()}: the volume was removed during detection; "
                             "results discarded")
        from .worker import load_registration, load_result

        result = load_result(run.output)
        nodes = self.publish(node, result, run.threshold)
        if run.locate:
            reg, error = load_registration(run.output)
            if reg is not None:
                self.registrations[node.GetID()] = reg
                self.syncTable(node)
            else:
                self.locationErrors[node.GetID()] = error or "location was not computed"
        return nodes

    # --- results ---------------------------------------------------------------------------
    def publish(self, inputVolumeNode, result, threshold=None) -> dict:
        """Store ``result`` for the volume and create/update its fiducial and table nodes."""
        scene = self.scene  # observed from now on: results die with the volume or the scene
        self.results[inputVolumeNode.GetID()] = result
        self.locationErrors.pop(inputVolumeNode.GetID(), None)
        nodes = mrml.publish_result(scene, inputVolumeNode, result, threshold)
        return nodes

    def resultNodes(self, inputVolumeNode) -> dict:
        return mrml.find_result_nodes(self.scene, inputVolumeNode)

    def setThreshold(self, inputVolumeNode, threshold: float) -> int:
        """Re-filter the stored candidates at ``threshold`` (no networks). Returns #lesions."""
        result = self.results.get(inputVolumeNode.GetID())
        if result is None:
            raise InputError("no detection result for this volume yet; press Detect first")
        if not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {threshold}")
        nodes = mrml.publish_result(self.scene, inputVolumeNode, result, threshold,
                                    new_run=False)
        return len(nodes["lesions"])

    def setStatus(self, inputVolumeNode, index: int, status: str) -> None:
        """Mark lesion ``index`` (row / control point) accepted, rejected or unreviewed."""
        nodes = self.resultNodes(inputVolumeNode)
        fid = nodes.get("fiducial")
        if fid is None or not 0 <= index < fid.GetNumberOfControlPoints():
            raise InputError(f"no lesion number {index + 1}")
        mrml.set_status(fid, index, status)
        self.syncTable(inputVolumeNode)

    def syncTable(self, inputVolumeNode) -> None:
        """Adopt hand-placed points as ``added`` lesions and rebuild the table from fiducials
        (with location columns and a fresh summary once :meth:`locate` has run)."""
        nodes = self.resultNodes(inputVolumeNode)
        fid, table = nodes.get("fiducial"), nodes.get("table")
        if fid is None:
            return
        mrml.adopt_added_points(fid)
        location = self._relocate(inputVolumeNode, fid)
        if table is not None:
            mrml.fill_table(table, fid, location=location)

    # --- location ----------------------------------------------------------------------------
    def _review_lesions(self, fid) -> list:
        statuses = {"unreviewed": "pending", "": "pending"}
        out = []
        for n in range(fid.GetNumberOfControlPoints()):
            info = mrml.point_info(fid, n)
            status = statuses.get(info["status"], info["status"])
            out.append({"id": n + 1, "label": info["label"], "centroid_ras": info["ras"],
                        "status": status})
        return out

    def _relocate(self, inputVolumeNode, fid):
        reg = self.registrations.get(inputVolumeNode.GetID())
        if reg is None:
            return None
        loc = reg.locate(self._review_lesions(fid))
        self.locations[inputVolumeNode.GetID()] = loc
        return {les.id: les.columns() | {"category": les.category + ("?" if les.uncertain
                                                                       else "")}
                for les in loc.lesions}

    def locate(self, inputVolumeNode, progress=None) -> list:
        """Register the scan to MNI once (seconds), then give every lesion its MARS category,
        atlas region and side in the table; returns the summary lines for the panel.
        Rejected lesions are excluded from the counts, added ones included; later review
        changes update the summary through :meth:`syncTable` in milliseconds."""
        from ..location.locate import register_to_mni

        key = inputVolumeNode.GetID()
        result = self.results.get(key)
        if result is None:
            raise InputError("no detection result for this volume yet; press Detect first")
        if key not in self.registrations:
            volume = mrml.volume_from_node(inputVolumeNode)
            mask = volume.with_array(result.brain_mask) if result.brain_mask is not None \
                else None
            self.registrations[key] = register_to_mni(volume, brain_mask=mask,
                                                      modality=result.modality,
                                                      progress=progress)
        self.syncTable(inputVolumeNode)
        return self.locationSummary(inputVolumeNode)

    def locationSummary(self, inputVolumeNode) -> list:
        from ..location.locate import summary_lines

        loc = self.locations.get(inputVolumeNode.GetID())
        if loc is not None:
            return summary_lines(loc.summary)
        error = self.locationErrors.get(inputVolumeNode.GetID())
        return [f"Location unavailable: {error}"] if error else []

    def exportReport(self, inputVolumeNode, path, registerIfMissing: bool = True) -> str:
        """One-page HTML report of the reviewed lesions (rejected excluded, added included).

        Without a registration yet, it is computed here (seconds) unless
        ``registerIfMissing`` is False (the panel: registration belongs in the worker)."""
        from ..location.report import write_report

        nodes = self.resultNodes(inputVolumeNode)
        fid = nodes.get("fiducial")
        result = self.results.get(inputVolumeNode.GetID())
        if fid is None or result is None:
            raise InputError("nothing to report; press Detect first")
        if inputVolumeNode.GetID() not in self.registrations:
            if not registerIfMissing:
                error = self.locationErrors.get(inputVolumeNode.GetID(), "")
                raise InputError("the report needs the lesion locations, which are "
                                 f"unavailable{': ' + error if error else ''}; press Detect "
                                 "again with location enabled")
            self.locate(inputVolumeNode)
        self.syncTable(inputVolumeNode)
        return write_report(path, mrml.volume_from_node(inputVolumeNode),
                            self._review_lesions(fid), self.locations[inputVolumeNode.GetID()],
                            result.model_version, result.modality, result.threshold)

    def removeResults(self, inputVolumeNode) -> int:
        self.forget(inputVolumeNode.GetID())
        return mrml.remove_result_nodes(self.scene, inputVolumeNode)

    def export(self, inputVolumeNode, outputDir, excludeRejected: bool = False,
               segmentation: bool = True, stem: str | None = None) -> dict:
        """Write ``<stem>.mrk.json``, ``<stem>_lesions.csv`` and optionally
        ``<stem>_cmb.nii.gz`` reflecting the review. Returns the paths by kind."""
        nodes = self.resultNodes(inputVolumeNode)
        fid = nodes.get("fiducial")
        if fid is None:
            raise InputError("nothing to export; press Detect first")
        self.syncTable(inputVolumeNode)
        os.makedirs(outputDir, exist_ok=True)
        stem = stem or _safe_name(inputVolumeNode.GetName())
        paths = {"markups": mrml.export_markups(
                     fid, os.path.join(outputDir, f"{stem}.mrk.json"), excludeRejected),
                 "csv": mrml.export_table(
                     fid, os.path.join(outputDir, f"{stem}_lesions.csv"), excludeRejected)}
        result = self.results.get(inputVolumeNode.GetID())
        if segmentation and result is not None:
            paths["labels"] = mrml.export_segmentation(
                result, fid, os.path.join(outputDir, f"{stem}_cmb.nii.gz"), excludeRejected)
        return paths

    def showSegmentation(self, inputVolumeNode, excludeRejected: bool = False):
        result = self.results.get(inputVolumeNode.GetID())
        fid = self.resultNodes(inputVolumeNode).get("fiducial")
        if result is None or fid is None:
            raise InputError("no detection result for this volume yet; press Detect first")
        return mrml.add_segmentation_node(self.scene, inputVolumeNode, result, fid,
                                          excludeRejected)


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or "volume"))
    return keep.strip("._") or "volume"


def worker_python() -> str:
    """The interpreter for the worker: ``PythonSlicer`` inside Slicer, else this Python."""
    exe = shutil.which("PythonSlicer")
    if exe is None:
        cand = os.path.join(os.path.dirname(sys.executable), "PythonSlicer")
        for c in (cand, cand + ".exe"):
            if os.path.exists(c):
                exe = c
    return exe or sys.executable


def run_worker(cmd, progress=None, cancel=None, idle=None, pollSeconds=0.05, output=None,
               env=None):
    """Run the worker command to its end, relay its progress, kill its process tree on
    cancel; return the result read from ``output``."""
    from .process import WorkerRun
    from .worker import load_result

    WorkerRun(cmd, progress=progress, env=env).wait(cancel=cancel, idle=idle,
                                                    pollSeconds=pollSeconds)
    return load_result(output)


def _worker_command(work, volume, mask, modality, settings, device, models_dir, detector_spec,
                    locate, python) -> list:
    """Write the inputs into ``work`` and build the worker's command line."""
    from ..engine.volume import write_volume

    write_volume(volume, os.path.join(work, "input.nii.gz"), compress=False)
    cmd = [python or worker_python(), "-m", "CMBDetectorLib.slicer_module.worker",
           "--input", os.path.join(work, "input.nii.gz"), "--modality", modality,
           "--output", os.path.join(work, "out")]
    if settings is not None:
        with open(os.path.join(work, "settings.json"), "w") as fh:
            json.dump(settings.to_dict(), fh)
        cmd += ["--settings", os.path.join(work, "settings.json")]
    if device is not None:
        cmd += ["--device", device]
    if models_dir:
        cmd += ["--models", str(models_dir)]
    if mask is not None:
        write_volume(mask, os.path.join(work, "mask.nii.gz"), compress=False)
        cmd += ["--mask", os.path.join(work, "mask.nii.gz")]
    if detector_spec:
        cmd += ["--detector", detector_spec]
    if locate:
        cmd += ["--locate"]
    return cmd


class DetectionRun:
    """A detection running in a worker process for one volume node (see
    :meth:`CMBDetectorLogic.startInSubprocess`)."""

    def __init__(self, volumeNode, worker, work: str, threshold, locate: bool):
        self.volumeNode = volumeNode
        self.worker = worker
        self.work = work
        self.output = os.path.join(work, "out")
        self.threshold = threshold
        self.locate = locate

    def poll(self) -> bool:
        """Relay progress; True once the worker has ended."""
        return self.worker.poll()

    def cancel(self) -> None:
        """Kill the worker's process tree and delete the temporary folder."""
        self.worker.kill()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
