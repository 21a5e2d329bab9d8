"""Detection end to end: preprocessing -> candidate U-Net -> student -> clean-up -> input grid.

``detect`` is the one entry point used by the command line, the Slicer module and cohort
processing. It never modifies its input and reports geometry in RAS and input voxel indices.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from .cleanup import edge_distance, shape_features, verdicts
from ..errors import Cancelled
from .inference import extract_candidates, predict_volume, score_candidates
from .preprocessing import prepare
from .projection import as_detected, direction_in_grid
from .results import Candidate, DetectionResult
from .settings import DetectionSettings
from .volume import Volume, read_volume, resample

#: Stage name -> (start, end) of the overall progress fraction.
STAGES = {"loading models": (0.0, 0.05), "preprocessing": (0.05, 0.25),
          "candidate detection": (0.25, 0.85), "discrimination": (0.85, 0.92),
          "clean-up": (0.92, 1.0)}


class _Progress:
    """Maps per-stage fractions to one overall fraction and checks for cancellation."""

    def __init__(self, progress, cancel):
        self.progress, self.cancel = progress, cancel
        self.timings: dict = {}
        self._stage, self._t0 = None, 0.0

    def stage(self, name: str) -> None:
        self.check()
        now = time.perf_counter()
        if self._stage is not None:
            self.timings[self._stage] = now - self._t0
        self._stage, self._t0 = name, now
        self.update(0.0)

    def update(self, fraction: float) -> None:
        if self.progress is not None and self._stage is not None:
            a, b = STAGES[self._stage]
            self.progress(self._stage, a + (b - a) * min(max(fraction, 0.0), 1.0))

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("detection cancelled")

    def finish(self) -> None:
        self.timings[self._stage] = time.perf_counter() - self._t0
        if self.progress is not None:
            self.progress("done", 1.0)


def default_settings(models=None, **overrides) -> DetectionSettings:
    """Settings with the operating point the bundled models were validated at, then overrides.

    ``models``: a loaded bundle, or its manifest's ``inference`` block (the operating point
    without loading the networks). An explicit ``threshold`` applies to every modality (it
    replaces the models' per-modality thresholds)."""
    point = models if isinstance(models, dict) else getattr(models, "settings", None)
    base = dict(point or {})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "threshold" in overrides and "modality_thresholds" not in overrides:
        base.pop("modality_thresholds", None)
    base.update(overrides)
    return DetectionSettings.from_dict(base) if base else DetectionSettings()


def detect(volume: Volume, modality: str, mask: Volume | None = None,
           settings: DetectionSettings | None = None, models=None, progress=None,
           cancel=None) -> DetectionResult:
    """Detect microbleeds in one scan.

    Parameters
    ----------
    volume : the scan (any orientation and spacing); never modified.
    modality : ``swi``, ``gre`` or ``qsm``.
    mask : optional brain mask on the scan's grid; built from the scan when omitted.
    settings : thresholds and clean-up rules; default = the bundled models' operating point.
    models : a loaded :class:`~CMBDetectorLib.engine.models.ModelBundle`; default = bundled weights.
    progress : ``progress(stage, fraction)`` with an overall fraction in [0, 1].
    cancel : ``cancel() -> bool``; when it returns True, :class:`Cancelled` is raised.
    """
    from .models import load_bundle

    prog = _Progress(progress, cancel)
    prog.stage("loading models")
    if models is None:
        models = load_bundle(device=(settings.device if settings else "auto"))
    settings = (settings or default_settings(models)).validate()

    prog.stage("preprocessing")
    projection, image = as_detected(volume, settings.reverse_projection)
    prep, channels = _preprocess(image, modality, mask, settings, _preprocessing_device(models))
    return _networks_and_cleanup(volume, prep, channels, settings, models, prog, projection)


def _preprocessing_device(models):
    """The GPU the networks run on, for the radial symmetry transform; None on the CPU,
    where the numpy transform is the faster one."""
    device = getattr(models, "device", None)
    return device if getattr(device, "type", "") == "cuda" else None


@dataclass
class PreparedScan:
    """A scan read and preprocessed for the networks: the CPU work a cohort runs ahead of
    detection (:func:`prepare_scan`), finished by :func:`detect_prepared`."""

    volume: Volume
    prep: object                 # preprocessing.Prepared
    channels: np.ndarray         # float32 [2, k, j, i]: image, FRST
    settings: DetectionSettings
    preprocess_s: float = 0.0
    read_s: float = 0.0
    projection: object = None    # projection.Projection when the voxels are an mIP


def prepare_scan(volume: Volume, modality: str, mask: Volume | None = None,
                 settings: DetectionSettings | None = None) -> PreparedScan:
    """The preprocessing stage of :func:`detect`, alone (needs no models when ``settings`` are
    given), so it can run in another process while the networks work on the previous scan."""
    settings = (settings or DetectionSettings()).validate()
    t0 = time.perf_counter()
    projection, image = as_detected(volume, settings.reverse_projection)
    prep, channels = _preprocess(image, modality, mask, settings)
    return PreparedScan(volume, prep, channels, settings, time.perf_counter() - t0,
                        projection=projection)


def prepare_file(path, modality: str, mask_path=None, settings=None) -> PreparedScan:
    """Read a scan (and mask) and :func:`prepare_scan` it; the reading time is kept."""
    t0 = time.perf_counter()
    volume = read_volume(path)
    mask = read_volume(mask_path) if mask_path else None
    read_s = time.perf_counter() - t0
    prepared = prepare_scan(volume, modality, mask, settings)
    prepared.read_s = read_s
    return prepared


def detect_prepared(prepared: PreparedScan, models=None, progress=None,
                    cancel=None) -> DetectionResult:
    """:func:`detect` from its preprocessing on: the same result for the same scan and settings
    (``timings`` hold the preprocessing time measured where it ran)."""
    from .models import load_bundle

    prog = _Progress(progress, cancel)
    prog.stage("loading models")
    if models is None:
        models = load_bundle(device=prepared.settings.device)
    prog.timings["preprocessing"] = prepared.preprocess_s
    return _networks_and_cleanup(prepared.volume, prepared.prep, prepared.channels,
                                 prepared.settings, models, prog, prepared.projection)


def _preprocess(volume: Volume, modality: str, mask, settings, device=None) -> tuple:
    """``(Prepared, channels)``: the working-grid image and its FRST stacked for the networks."""
    prep = prepare(volume, modality, mask, settings, device)
    return prep, np.stack([prep.image, prep.frst]).astype(np.float32)


def _networks_and_cleanup(volume: Volume, prep, channels: np.ndarray,
                          settings: DetectionSettings, models, prog: _Progress,
                          projection=None) -> DetectionResult:
    """Candidate U-Net, student and clean-up on a preprocessed scan; results on its input grid.
    ``projection``: what :func:`~.projection.find_projection` found in the input (found with
    the preprocessing, which a cohort runs ahead of the networks)."""
    with warnings.catch_warnings(record=True) as caught:  # e.g. CUDA out of memory -> CPU
        warnings.simplefilter("always", RuntimeWarning)
        prog.stage("candidate detection")
        prob = predict_volume(models.detector, channels, settings.tile_size,
                              settings.tile_overlap, progress=prog.update, cancel=prog.check)
        labels, voxels, pmax, centres = extract_candidates(
            prob, settings.candidate_threshold, prep.mask, settings.split_parameters(),
            (settings.working_spacing_mm,) * 3)

        prog.stage("discrimination")
        patch = int(models.manifest.get("patch_size", 24)) if hasattr(models, "manifest") else 24
        conf = score_candidates(models.student, channels, centres, patch, settings.batch_size,
                                settings.mirrored_scoring)
    notes = list(getattr(models, "notes", [])) + _reissue(caught)

    prog.stage("clean-up")
    spacing = prep.grid.spacing
    across = None
    if projection is not None:
        undone = projection.reversible and settings.reverse_projection
        notes.append(projection.note(settings.shape_across_projection and not undone, undone))
        if settings.shape_across_projection and not undone:
            across = direction_in_grid(projection.direction_ras, prep.grid)
    vol_mm3, elong = shape_features(labels, len(centres), spacing, across)
    edge = edge_distance(prep.mask, centres, spacing)
    reasons = verdicts(vol_mm3, elong, voxels, edge, settings)
    ras = prep.grid.ijk_to_ras_points(centres[:, ::-1]) if len(centres) else np.zeros((0, 3))
    ijk = volume.ras_to_ijk_points(ras) if len(centres) else np.zeros((0, 3))
    candidates = [Candidate(n + 1, tuple(ras[n]), tuple(ijk[n]), float(vol_mm3[n]),
                            float(pmax[n]), float(conf[n]), reasons[n] == "", reasons[n],
                            float(elong[n]), float(edge[n]))
                  for n in range(len(centres))]
    cand_input = _to_input_grid(prep.grid.with_array(labels), volume, ijk)
    mask_input = _to_input_grid(prep.grid.with_array(prep.mask.astype(np.int32)), volume)
    prog.finish()
    return DetectionResult(modality=prep.modality, ijk_to_ras=volume.ijk_to_ras.copy(),
                           shape=tuple(volume.array.shape), candidates=candidates,
                           candidate_labels=cand_input,
                           threshold=settings.threshold_for(prep.modality),
                           timings=prog.timings, model_version=getattr(models, "version", ""),
                           settings=settings.to_dict(),
                           brain_mask=mask_input.astype(np.uint8),
                           device=device_used(models), device_name=device_name(models),
                           warnings=notes)


def _reissue(caught) -> list:
    """Show recorded warnings again (the CLI prints them) and return their texts for the
    result, so a GPU-to-CPU fallback is also visible in Slicer and in detection.json."""
    notes = []
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        notes.append(str(w.message))
    return notes


def device_name(models) -> str:
    """The GPU's name when the networks ran on CUDA ("" on the CPU)."""
    if device_used(models) != "cuda":
        return ""
    import torch

    return torch.cuda.get_device_name(next(models.detector.parameters()).device)


def device_used(models) -> str:
    """Where the networks ran: ``cuda`` only if both stayed there (``cpu`` after a fallback)."""
    devices = set()
    for net in (getattr(models, "detector", None), getattr(models, "student", None)):
        try:
            devices.add(next(net.parameters()).device.type)
        except (AttributeError, StopIteration, TypeError):
            continue
    if not devices:
        return ""
    return "cuda" if devices == {"cuda"} else "cpu"


def _to_input_grid(labels: Volume, volume: Volume, centres_ijk=None) -> np.ndarray:
    """Nearest-neighbour label map on the input grid; a candidate thinner than an input voxel
    (thick slices) still keeps the voxel at its centroid."""
    ref = volume.with_array(np.zeros(volume.array.shape, np.uint8))
    out = resample(labels, None, "nearest", reference=ref).array.astype(np.int32)
    if centres_ijk is not None and len(centres_ijk):
        present = np.zeros(int(labels.array.max()) + 2, bool)
        present[:out.max() + 1] = np.bincount(out.ravel()) > 0  # linear, unlike np.unique
        shape = np.array(out.shape[::-1])
        for n, c in enumerate(np.rint(centres_ijk).astype(int), start=1):
            if not present[n] and np.all((c >= 0) & (c < shape)):
                out[c[2], c[1], c[0]] = n
    return out


def detect_file(path, modality: str, mask_path=None, settings=None, models=None,
                progress=None, cancel=None):
    """Read a scan (and mask) from disk and detect; returns ``(volume, result)``."""
    volume = read_volume(path)
    mask = read_volume(mask_path) if mask_path else None
    return volume, detect(volume, modality, mask, settings, models, progress, cancel)
