"""What detection returns: every candidate with its scores, and lesions at any threshold.

All candidates are kept with their detector and student probabilities and their clean-up verdict,
so a new confidence threshold is applied in microseconds without running the networks again (the
Slicer slider relies on this).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Candidate:
    """One connected component of the candidate detector's output.

    Coordinates refer to the *input* scan: ``centroid_ijk`` are continuous voxel indices
    ``(i, j, k)`` of the input grid, ``centroid_ras`` RAS millimetres.
    """

    index: int                      # label of this candidate in ``DetectionResult.candidate_labels``
    centroid_ras: tuple
    centroid_ijk: tuple
    volume_mm3: float
    candidate_probability: float    # max detector probability in the component
    confidence: float               # student probability that it is a CMB
    kept: bool = True               # passed the morphological clean-up
    reason: str = ""                # why the clean-up removed it ("" when kept)
    elongation: float = 0.0         # 1 - smallest/largest principal axis (0 = sphere)
    edge_distance_mm: float = math.inf  # centroid distance to the brain-mask boundary

    @property
    def diameter_mm(self) -> float:
        """Diameter of the sphere with the same volume."""
        return float((6.0 * self.volume_mm3 / math.pi) ** (1.0 / 3.0))


@dataclass
class Lesion:
    """A reported microbleed (a kept candidate above the confidence threshold)."""

    id: int
    label: str
    centroid_ras: tuple
    centroid_ijk: tuple
    volume_mm3: float
    diameter_mm: float
    candidate_probability: float
    confidence: float
    candidate_index: int

    def as_row(self) -> dict:
        r, a, s = self.centroid_ras
        i, j, k = self.centroid_ijk
        return {"id": self.id, "label": self.label, "R": round(r, 2), "A": round(a, 2),
                "S": round(s, 2), "i": round(i, 2), "j": round(j, 2), "k": round(k, 2),
                "volume_mm3": round(self.volume_mm3, 2), "diameter_mm": round(self.diameter_mm, 2),
                "candidate_probability": round(self.candidate_probability, 4),
                "confidence": round(self.confidence, 4)}


LESION_COLUMNS = ["id", "label", "R", "A", "S", "i", "j", "k", "volume_mm3", "diameter_mm",
                  "candidate_probability", "confidence"]


@dataclass
class DetectionResult:
    """Everything one detection run produced, on the input scan's grid."""

    modality: str
    ijk_to_ras: np.ndarray
    shape: tuple                     # input array shape [k, j, i]
    candidates: list = field(default_factory=list)
    candidate_labels: np.ndarray | None = None  # int32 [k, j, i]; value = Candidate.index
    threshold: float = 0.5
    timings: dict = field(default_factory=dict)
    model_version: str = ""
    settings: dict = field(default_factory=dict)
    brain_mask: np.ndarray | None = None        # uint8 [k, j, i] on the input grid
    device: str = ""                 # device the networks actually ran on ("cuda", "cpu")
    device_name: str = ""            # the GPU's name when that was CUDA
    warnings: list = field(default_factory=list)  # e.g. the GPU ran out of memory: CPU used

    def lesions(self, threshold: float | None = None) -> list:
        """Kept candidates with ``confidence >= threshold``, most confident first, ids 1..n."""
        t = self.threshold if threshold is None else float(threshold)
        chosen = [c for c in self.candidates if c.kept and c.confidence >= t]
        chosen.sort(key=lambda c: (-c.confidence, -c.candidate_probability, c.index))
        return [Lesion(n, f"CMB-{n}", tuple(map(float, c.centroid_ras)),
                       tuple(map(float, c.centroid_ijk)), float(c.volume_mm3), c.diameter_mm,
                       float(c.candidate_probability), float(c.confidence), c.index)
                for n, c in enumerate(chosen, start=1)]

    def label_map(self, threshold: float | None = None) -> np.ndarray:
        """Lesion label map ``[k, j, i]`` on the input grid; value n = lesion ``CMB-n``."""
        out = np.zeros(self.shape, np.uint16)
        if self.candidate_labels is None:
            return out
        lut = np.zeros(int(self.candidate_labels.max()) + 1, np.uint16)
        for les in self.lesions(threshold):
            lut[les.candidate_index] = les.id
        return lut[self.candidate_labels]

    def stage_counts(self, threshold: float | None = None) -> dict:
        """How many survive each stage (candidates, student, clean-up) like the paper's Table 3."""
        t = self.threshold if threshold is None else float(threshold)
        return {"candidates": len(self.candidates),
                "after_student": sum(c.confidence >= t for c in self.candidates),
                "after_cleanup": len(self.lesions(t))}

    def summary(self) -> dict:
        """JSON-ready provenance and candidate list (label maps excluded)."""
        return {"modality": self.modality, "threshold": self.threshold,
                "model_version": self.model_version, "settings": self.settings,
                "device": self.device, "device_name": self.device_name,
                "warnings": list(self.warnings),
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
                "ijk_to_ras": np.asarray(self.ijk_to_ras).tolist(), "shape_kji": list(self.shape),
                "stage_counts": self.stage_counts(),
                "candidates": [_jsonable(asdict(c)) for c in self.candidates]}


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (tuple, list, np.ndarray)):
            out[k] = [float(x) for x in v]
        elif isinstance(v, (np.floating, float)):
            out[k] = None if not math.isfinite(float(v)) else float(v)
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            out[k] = v
    return out
