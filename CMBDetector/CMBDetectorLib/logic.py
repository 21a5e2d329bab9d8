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
import subprocess
import sys
import tempfile
import time
from typing import Callable

from . import MODALITIES, mrml
from .errors import Cancelled, CMBError, InputError
from .settings import DetectionSettings
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


def torch_info() -> dict:
    """Installed torch version and the device ``auto`` would use (imports torch: call lazily)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return {"installed": False, "version": "", "cuda": False, "device": "cpu", "gpu": ""}
    import torch

    cuda = bool(torch.backends.cuda.is_built() and torch.cuda.is_available())
    return {"installed": True, "version": torch.__version__, "cuda": cuda,
            "device": "cuda" if cuda else "cpu",
            "gpu": torch.cuda.get_device_name(0) if cuda else "",
            "cuda_version": getattr(torch.version, "cuda", None) or ""}


class CMBDetectorLogic:
    """Run detection on MRML volume nodes and manage the result nodes of each volume.

    Parameters
    ----------
    scene : vtkMRMLScene, optional
        Scene to work in; default ``slicer.mrmlScene``.
    detector : callable, optional
        ``detector(volume, modality, mask=, settings=, progress=, cancel=) -> DetectionResult``
        (``settings`` may be None); default :func:`engine_detect`, i.e. the engine's
        :func:`CMBDetectorLib.detection.detect` with the bundled weights.
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

    @property
    def scene(self):
        return mrml._scene_of(self._scene)

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
                            idle=None, python=None, detectorSpec=None, pollSeconds=0.05) -> dict:
        """Like :meth:`process`, but the engine runs in a child Python (``PythonSlicer``).

        The GUI stays responsive when ``idle`` (e.g. ``slicer.app.processEvents``) is called
        while waiting; ``cancel()`` returning True kills the child at once.
        """
        s, dev = self.makeSettings(settings), self.normaliseDevice(device)
        self._checkThreshold(threshold)
        volume, mask, modality = self.prepare(inputVolumeNode, modality, maskNode)
        work = tempfile.mkdtemp(prefix="CMBDetector-")
        try:
            from .volume import write_volume

            write_volume(volume, os.path.join(work, "input.nii.gz"), compress=False)
            cmd = [python or worker_python(), "-m", "CMBDetectorLib.worker",
                   "--input", os.path.join(work, "input.nii.gz"), "--modality", modality,
                   "--output", os.path.join(work, "out")]
            if s is not None:
                with open(os.path.join(work, "settings.json"), "w") as fh:
                    json.dump(s.to_dict(), fh)
                cmd += ["--settings", os.path.join(work, "settings.json")]
            if dev is not None:
                cmd += ["--device", dev]
            if self.modelsDirectory:
                cmd += ["--models", str(self.modelsDirectory)]
            if mask is not None:
                write_volume(mask, os.path.join(work, "mask.nii.gz"), compress=False)
                cmd += ["--mask", os.path.join(work, "mask.nii.gz")]
            if detectorSpec:
                cmd += ["--detector", detectorSpec]
            result = run_worker(cmd, progress=progress, cancel=cancel, idle=idle,
                                pollSeconds=pollSeconds, output=os.path.join(work, "out"))
            return self.publish(inputVolumeNode, result, threshold)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # --- results ---------------------------------------------------------------------------
    def publish(self, inputVolumeNode, result, threshold=None) -> dict:
        """Store ``result`` for the volume and create/update its fiducial and table nodes."""
        self.results[inputVolumeNode.GetID()] = result
        nodes = mrml.publish_result(self.scene, inputVolumeNode, result, threshold)
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
        from .location import register_to_mni

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
        from .location import summary_lines

        loc = self.locations.get(inputVolumeNode.GetID())
        return summary_lines(loc.summary) if loc is not None else []

    def exportReport(self, inputVolumeNode, path) -> str:
        """One-page HTML report of the reviewed lesions (rejected excluded, added included)."""
        from .report import write_report

        nodes = self.resultNodes(inputVolumeNode)
        fid = nodes.get("fiducial")
        result = self.results.get(inputVolumeNode.GetID())
        if fid is None or result is None:
            raise InputError("nothing to report; press Detect first")
        if inputVolumeNode.GetID() not in self.registrations:
            self.locate(inputVolumeNode)
        self.syncTable(inputVolumeNode)
        return write_report(path, mrml.volume_from_node(inputVolumeNode),
                            self._review_lesions(fid), self.locations[inputVolumeNode.GetID()],
                            result.model_version, result.modality, result.threshold)

    def removeResults(self, inputVolumeNode) -> int:
        self.results.pop(inputVolumeNode.GetID(), None)
        self.registrations.pop(inputVolumeNode.GetID(), None)
        self.locations.pop(inputVolumeNode.GetID(), None)
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
    """Run the worker command, relay its progress, kill it on cancel; return the result.

    Cancel latency is one poll interval plus the kill (well under 2 s).
    """
    from .worker import DONE_TAG, ERROR_TAG, PROGRESS_TAG, load_result

    lib_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib_parent, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    errors: list = []
    tail: list = []
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1)
    lines: list = []
    lock = threading.Lock()

    def pump():  # a reader thread: the main loop never blocks on the pipe
        for line in proc.stdout:
            with lock:
                lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            finished = proc.poll() is not None and not reader.is_alive()
            with lock:
                pending, lines[:] = list(lines), []
            for line in pending:
                parts = line.split("\t")
                if parts[0] == PROGRESS_TAG and len(parts) == 3 and progress is not None:
                    progress(parts[1], float(parts[2]))
                elif parts[0] == ERROR_TAG:
                    errors.append("\t".join(parts[1:]))
                elif parts[0] != DONE_TAG:
                    tail.append(line)
                    del tail[:-20]
            if cancel is not None and cancel():
                proc.kill()
                proc.wait(timeout=5)
                raise Cancelled("detection cancelled")
            if finished:
                break
            if idle is not None:
                idle()
            time.sleep(pollSeconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    if proc.returncode != 0:
        if errors:
            raise CMBError(errors[-1])
        raise CMBError("detection worker failed (exit code %s): %s"
                       % (proc.returncode, " | ".join(tail[-5:]) or "no output"))
    return load_result(output)
