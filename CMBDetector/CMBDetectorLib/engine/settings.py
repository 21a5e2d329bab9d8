"""Every tunable of detection in one dataclass, with documented defaults and units."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .. import MODALITIES
from ..errors import InputError

#: The intensity scalings :func:`~CMBDetectorLib.engine.preprocessing.normalise` knows.
NORMALISATIONS = ("percentile", "iqr", "quantile")
#: The foreground thresholds of :func:`~CMBDetectorLib.engine.preprocessing.brain_mask`.
MASK_THRESHOLDS = ("intensity", "log")


@dataclass
class DetectionSettings:
    """Detection settings. Distances in mm, volumes in mm^3, probabilities in [0, 1].

    The networks run on an isotropic working grid of ``working_spacing_mm``; everything reported
    is mapped back to the input grid through RAS.
    """

    #: Student probability a kept candidate needs to be reported (the Slicer slider).
    threshold: float = 0.5
    #: Per-modality student thresholds, e.g. ``{"gre": 0.75}``; a modality not listed uses
    #: ``threshold``. The bundled operating point sets them (each modality has its own false
    #: positives: calcifications on GRE, veins on SWI); an explicit threshold overrides them.
    modality_thresholds: dict = field(default_factory=dict)
    #: Detector probability that makes a voxel part of a candidate (low: the detector is tuned
    #: for sensitivity; the student removes false positives).
    candidate_threshold: float = 0.3
    #: One candidate per focus: split thresholded components at separate probability peaks
    #: (``split_prob_h`` above the saddle) or round lobes (``split_shape_h_mm`` of distance to
    #: the border above the neck), peaks at least ``split_min_separation_mm`` apart
    #: (:mod:`~CMBDetectorLib.engine.splitting`). Off for the bundled models (validated on whole
    #: components); a bundle trained with it sets it in its manifest.
    split_candidates: bool = False
    split_prob_h: float = 0.15
    split_shape_h_mm: float = 1.0
    split_min_separation_mm: float = 3.0
    #: Isotropic spacing (mm) the scan is resampled to for the networks.
    working_spacing_mm: float = 1.0
    #: Automatic brain mask of GRE/SWI: grey-scale closing (mm) of the image before its
    #: threshold, which fills thin dark bands (the cortical rim SWI's phase mask darkens, sulcal
    #: veins) that otherwise cut brain and surface CMBs out of the mask. 0 = no closing. The
    #: networks are trained with one mask, so a model bundle sets this (its manifest).
    mask_closing_mm: float = 0.0
    #: Automatic brain mask of GRE/SWI: foreground threshold on the ``intensity`` (the bundled
    #: models') or on the ``log`` intensity (a gamma or another scanner's gain leaves the mask
    #: in place). A model bundle sets it (its manifest).
    mask_threshold: str = "intensity"
    #: Intensity scaling before the networks (:func:`~CMBDetectorLib.engine.preprocessing.normalise`):
    #: ``percentile`` (the first bundled models: brain median to 0, the 0.5th/99.5th percentile
    #: to 1, which depends on how many veins a scan holds) or ``iqr`` (median to 0, 3.5
    #: interquartile ranges of brain tissue to 1: independent of the scan's vein and lesion
    #: content) or ``quantile`` (the brain's histogram mapped onto a fixed one at 15
    #: percentiles: nearly unchanged by a gamma or another scanner's intensity curve). A model
    #: bundle sets it in its manifest; the networks only work with the one they were trained
    #: with.
    normalisation: str = "percentile"
    #: Fast radial symmetry transform radii (mm) and radial strictness.
    frst_radii_mm: tuple = (1.0, 2.0, 3.0)
    frst_alpha: float = 2.0
    #: Sliding-window tile edge (voxels of the working grid) and overlap fraction. 224 runs
    #: every brain of the training and validation sets in one pass (their bounding boxes reach
    #: 208 voxels front to back; with 192, 28 % of them were split in two tiles: 0.9 s more on
    #: a 144x204x174 box and tile borders in the prediction); peak memory 1.9 GB there.
    #: Larger boxes are split into fitted tiles.
    tile_size: int = 224
    tile_overlap: float = 0.15
    #: Clean-up: component volume range (mm^3) on the working grid. 2 mm^3 ~ a 1.6 mm sphere.
    #: The largest CMB is 10 mm across (Greenberg criteria: 524 mm^3), but a candidate is the
    #: detector's component at its floor, which reaches past the visible edge: validation CMBs
    #: of 8.2-9.2 mm visible gave components 1.2-1.65x their visible volume (up to 628 mm^3)
    #: and a gamma change moves it by 20 %; 1000 mm^3 (a 12.4 mm sphere) keeps a 10 mm CMB.
    #: Until 2026-12-06 it was 525, which removed 9.2 mm QSM CMBs as "too large".
    min_volume_mm3: float = 2.0
    max_volume_mm3: float = 1000.0
    #: Clean-up: maximal elongation 1 - sqrt(l_min/l_max) of the component's inertia (veins
    #: are tubes, CMBs round); applied to components of at least ``elongation_min_voxels``.
    max_elongation: float = 0.75
    elongation_min_voxels: int = 6
    #: Clean-up on a scan whose voxels are a projection over slices (an mIP, found from the
    #: voxels by :mod:`~CMBDetectorLib.engine.projection`): measure elongation across the
    #: projection axis, along which the projection stretches every focus by its slab
    #: (docs/experiments/v31_projection: 3 more visible SWI CMBs of 140 on the selection scans,
    #: no more false positives).
    shape_across_projection: bool = True
    #: Detect on a projection over slices reversed first: the sliding maximum over the same
    #: slab gives back every dark focus's own extent (:func:`~CMBDetectorLib.engine.projection.reverse_projection`;
    #: docs/experiments/v31_unprojection). The elongation is then measured in 3D; a
    #: projection that cannot be reversed keeps ``shape_across_projection``.
    reverse_projection: bool = True
    #: Clean-up: candidates whose centroid lies closer than this to the brain-mask boundary are
    #: removed (pial veins, sinus and skull-base artefacts).
    min_edge_distance_mm: float = 3.0
    #: Inference device: auto (CUDA when available), cpu or cuda.
    device: str = "auto"
    #: Candidates scored per student forward pass.
    batch_size: int = 64
    #: Average the student over each patch's eight mirror images (the bundled operating point
    #: was chosen with it on).
    mirrored_scoring: bool = True

    def split_parameters(self) -> dict | None:
        """The candidate-splitting keyword arguments, or None when splitting is off."""
        if not self.split_candidates:
            return None
        return {"prob_h": self.split_prob_h, "shape_h_mm": self.split_shape_h_mm,
                "min_separation_mm": self.split_min_separation_mm}

    def validate(self) -> "DetectionSettings":
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"threshold must be in [0, 1], got {self.threshold}")
        for modality, t in self.modality_thresholds.items():
            if modality not in MODALITIES:
                raise InputError(f"modality_thresholds: unknown modality {modality!r} "
                                 f"(expected one of {', '.join(MODALITIES)})")
            if not 0.0 <= float(t) <= 1.0:
                raise InputError(f"{modality} threshold must be in [0, 1], got {t}")
        if not 0.0 < self.candidate_threshold < 1.0:
            raise InputError(f"candidate threshold must be in (0, 1), got "
                             f"{self.candidate_threshold}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.mask_closing_mm <= 10.0:
            raise InputError(f"mask_closing_mm must be in [0, 10], got {self.mask_closing_mm}")
        if self.mask_threshold not in MASK_THRESHOLDS:
            raise InputError(f"mask_threshold must be one of {', '.join(MASK_THRESHOLDS)}, "
                             f"got {self.mask_threshold!r}")
        if self.normalisation not in NORMALISATIONS:
            raise InputError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, "
                             f"got {self.normalisation!r}")
        if self.min_volume_mm3 > self.max_volume_mm3:
            raise InputError("min_volume_mm3 exceeds max_volume_mm3")
        return self

    def threshold_for(self, modality: str) -> float:
        """The student threshold that applies to a scan of ``modality``."""
        return float(self.modality_thresholds.get(modality, self.threshold))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["frst_radii_mm"] = list(self.frst_radii_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DetectionSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "frst_radii_mm" in d:
            d["frst_radii_mm"] = tuple(d["frst_radii_mm"])
        if "modality_thresholds" in d:
            d["modality_thresholds"] = {str(k): float(v)
                                        for k, v in dict(d["modality_thresholds"] or {}).items()}
        return cls(**d).validate()
