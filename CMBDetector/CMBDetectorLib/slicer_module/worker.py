"""Detection in a separate process, so Slicer's GUI stays responsive and Cancel is a kill.

Run as ``PythonSlicer -m CMBDetectorLib.slicer_module.worker --input scan.nii.gz --modality swi --output DIR``
(any Python with the engine's dependencies works). Progress goes to stdout as one line per
update, ``CMB-PROGRESS<TAB>stage<TAB>fraction``; a user error as ``CMB-ERROR<TAB>message`` with
exit code 1; a warning (e.g. the GPU ran out of memory and the CPU took over) as
``CMB-WARNING<TAB>message``. The result is written to ``DIR/result.json`` (candidates, provenance,
the device actually used) and ``DIR/result.npz`` (candidate label map, brain mask) and read back
with :func:`load_result`. With ``--locate`` the worker also registers the scan to MNI (seconds
of CPU that must not freeze Slicer) and writes ``DIR/registration.tfm`` + ``registration.json``,
read back with :func:`load_registration`. ``--probe-device`` prints what torch sees, so Slicer's
own process never imports torch or initialises CUDA.
JSON + npz instead of pickle: nothing executable crosses the process border. Imports neither
Qt nor ``slicer``, so it runs in a bare ``PythonSlicer``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from dataclasses import asdict, fields

import numpy as np

from ..errors import CMBError, InputError
from .process import DONE_TAG, ERROR_TAG, PROGRESS_TAG, WARNING_TAG  # noqa: F401 (re-export)
from ..engine.results import Candidate, DetectionResult

DEVICE_TAG = "CMB-DEVICE"


def _plain(value):
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def save_result(result: DetectionResult, folder) -> None:
    """Write ``result`` to ``folder`` as result.json + result.npz (atomic renames).

    Only ``folder`` itself is created: when its parent is gone (the caller cancelled and
    cleaned up), nothing is written and nothing is recreated."""
    _make_leaf(folder)
    meta = {"modality": result.modality, "ijk_to_ras": _plain(result.ijk_to_ras),
            "shape": list(result.shape), "threshold": float(result.threshold),
            "timings": _plain(result.timings), "model_version": result.model_version,
            "settings": _plain(result.settings), "device": result.device,
            "device_name": getattr(result, "device_name", ""),
            "warnings": list(result.warnings),
            "candidates": [_plain(asdict(c)) for c in result.candidates]}
    arrays = {}
    if result.candidate_labels is not None:
        arrays["candidate_labels"] = result.candidate_labels
    if result.brain_mask is not None:
        arrays["brain_mask"] = result.brain_mask
    tmp = os.path.join(folder, ".result.npz.part.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(folder, "result.npz"))
    tmp = os.path.join(folder, ".result.json.part")
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, os.path.join(folder, "result.json"))


def _make_leaf(folder) -> None:
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise CMBError(f"{parent}: the output's folder is gone (cancelled?); nothing written")
    os.makedirs(folder, exist_ok=True)


def save_registration(registration, folder) -> None:
    """Write an :class:`~CMBDetectorLib.location.locate.MNIRegistration` (transform + quality)."""
    import SimpleITK as sitk

    _make_leaf(folder)
    sitk.WriteTransform(registration.transform, os.path.join(folder, "registration.tfm"))
    with open(os.path.join(folder, "registration.json"), "w") as fh:
        json.dump(_plain(asdict(registration.quality)), fh)


def save_location_error(message: str, folder) -> None:
    """Record why location is unavailable (detection results stay valid)."""
    _make_leaf(folder)
    with open(os.path.join(folder, "registration.json"), "w") as fh:
        json.dump({"error": str(message)}, fh)


def load_registration(folder):
    """``(MNIRegistration or None, error message or "")`` from what the worker wrote."""
    path = os.path.join(folder, "registration.json")
    if not os.path.exists(path):
        return None, ""
    with open(path) as fh:
        meta = json.load(fh)
    if "error" in meta:
        return None, meta["error"]
    import SimpleITK as sitk

    from ..location.locate import MNIRegistration, RegistrationQuality

    transform = sitk.ReadTransform(os.path.join(folder, "registration.tfm"))
    return MNIRegistration(transform, RegistrationQuality(**meta)), ""


def load_result(folder) -> DetectionResult:
    """Read what :func:`save_result` wrote."""
    path = os.path.join(folder, "result.json")
    if not os.path.exists(path):
        raise CMBError(f"{folder}: the detection worker produced no result")
    with open(path) as fh:
        meta = json.load(fh)
    names = {f.name for f in fields(Candidate)}
    cands = []
    for d in meta["candidates"]:
        d = {k: v for k, v in d.items() if k in names}
        d["centroid_ras"] = tuple(d["centroid_ras"])
        d["centroid_ijk"] = tuple(d["centroid_ijk"])
        if d.get("edge_distance_mm") is None:
            d["edge_distance_mm"] = math.inf
        cands.append(Candidate(**d))
    with np.load(os.path.join(folder, "result.npz")) as npz:
        labels = npz["candidate_labels"] if "candidate_labels" in npz else None
        mask = npz["brain_mask"] if "brain_mask" in npz else None
    return DetectionResult(modality=meta["modality"], ijk_to_ras=np.array(meta["ijk_to_ras"]),
                           shape=tuple(meta["shape"]), candidates=cands,
                           candidate_labels=labels, threshold=meta["threshold"],
                           timings=meta.get("timings", {}),
                           model_version=meta.get("model_version", ""),
                           settings=meta.get("settings", {}), brain_mask=mask,
                           device=meta.get("device", ""),
                           device_name=meta.get("device_name", ""),
                           warnings=list(meta.get("warnings", [])))


def engine_detect(volume, modality, mask=None, settings=None, device=None, progress=None,
                  cancel=None, models_dir=None):
    """The real engine with the bundled weights (or those in ``models_dir``, e.g. fine-tuned)
    on ``device`` (auto/cpu/cuda).

    Without ``settings`` the operating point stored with the weights is used (only the device
    is overridden), so the GUI does not silently replace validated thresholds by defaults.
    """
    from ..engine.detection import default_settings, detect
    from ..engine.models import load_bundle

    if progress is not None:
        progress("loading models", 0.0)
    dev = device or (settings.device if settings is not None else "auto")
    models = load_bundle(models_dir, device=dev)
    if settings is None:
        settings = default_settings(models, device=dev)
    elif device:
        settings.device = device
    return detect(volume, modality, mask=mask, settings=settings, models=models,
                  progress=progress, cancel=cancel)


def resolve_detector(spec: str):
    """``"package.module:function"`` -> that callable (a stand-in for tests)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "detect")


def _one_line(text) -> str:
    return str(text).replace("\t", " ").replace("\n", " ")


def _progress(stage: str, fraction: float) -> None:
    print(f"{PROGRESS_TAG}\t{_one_line(stage)}\t{float(fraction):.4f}", flush=True)


def probe_device() -> dict:
    """What torch sees here: version, whether CUDA works, the GPU's name (imports torch)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return {"installed": False, "version": "", "cuda": False, "device": "cpu", "gpu": ""}
    import torch

    cuda = bool(torch.backends.cuda.is_built() and torch.cuda.is_available())
    return {"installed": True, "version": torch.__version__, "cuda": cuda,
            "device": "cuda" if cuda else "cpu",
            "gpu": torch.cuda.get_device_name(0) if cuda else "",
            "cuda_version": getattr(torch.version, "cuda", None) or ""}


def _locate(volume, result, output) -> None:
    """Register to MNI for lesion location; a failure is recorded, not raised."""
    from ..location.locate import register_to_mni

    try:
        mask = volume.with_array(result.brain_mask) if result.brain_mask is not None else None
        reg = register_to_mni(volume, brain_mask=mask, modality=result.modality,
                              progress=_progress)
    except CMBError as exc:
        save_location_error(str(exc), output)
        print(f"{WARNING_TAG}\tlocation unavailable: {_one_line(exc)}", flush=True)
        return
    save_registration(reg, output)


def run(args) -> int:
    from ..engine.settings import DetectionSettings
    from ..engine.volume import read_volume

    settings = None
    if args.settings:
        with open(args.settings) as fh:
            settings = DetectionSettings.from_dict(json.load(fh))
    _progress("reading input", 0.0)
    volume = read_volume(args.input)
    mask = read_volume(args.mask) if args.mask else None
    if mask is not None:
        if not volume.same_grid(mask):
            raise InputError("the brain mask is not on the scan's grid")
        mask = volume.with_array((mask.array > 0).astype(np.uint8))
    if args.detector:
        result = resolve_detector(args.detector)(volume, args.modality, mask=mask,
                                                 settings=settings, progress=_progress,
                                                 cancel=None)
    else:
        result = engine_detect(volume, args.modality, mask=mask, settings=settings,
                               device=args.device, progress=_progress, models_dir=args.models)
    for text in getattr(result, "warnings", []):
        print(f"{WARNING_TAG}\t{_one_line(text)}", flush=True)
    _progress("writing result", 1.0)
    save_result(result, args.output)
    if args.locate:
        _locate(volume, result, args.output)
    print(DONE_TAG, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="CMBDetectorLib.slicer_module.worker", description=__doc__.splitlines()[0])
    p.add_argument("--input", help="scan (.nii.gz/.nrrd) in world geometry")
    p.add_argument("--modality", choices=("swi", "gre", "qsm"))
    p.add_argument("--mask", help="brain mask on the scan's grid")
    p.add_argument("--settings", help="JSON file of DetectionSettings")
    p.add_argument("--output", help="folder for result.json / result.npz")
    p.add_argument("--locate", action="store_true",
                   help="also register to MNI for lesion location (registration.tfm/.json)")
    p.add_argument("--probe-device", action="store_true",
                   help="print what torch sees (version, CUDA, GPU name) and exit")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="inference device")
    p.add_argument("--models", help="weights folder with manifest.json (default: bundled)")
    p.add_argument("--detector", help="module:function replacing the engine (tests)")
    return p


def _limit_threads(value) -> None:
    """Thread limits for this worker process only (never set in Slicer's own process)."""
    if not value:
        return
    n = int(value)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe_device:
        print(f"{DEVICE_TAG}\t{json.dumps(probe_device())}", flush=True)
        return 0
    if not (args.input and args.modality and args.output):
        parser.error("--input, --modality and --output are required")
    _limit_threads(os.environ.get("CMBDETECTOR_THREADS"))
    try:
        return run(args)
    except CMBError as exc:
        print(f"{ERROR_TAG}\t{exc}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
