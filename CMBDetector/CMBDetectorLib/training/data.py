"""Training data: scans -> the engine's own working grid -> patch banks for each network.

Training sees exactly what inference sees: every scan goes through
:func:`~CMBDetectorLib.engine.preprocessing.prepare` (same resampling, brain mask, normalisation and
FRST), and discriminator patches come from the detector's own candidates on subjects it never
saw (out-of-fold), plus every ground-truth lesion and hard negatives centred on the mimics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..engine.inference import STRUCTURE_26, extract_candidates, extract_patches, predict_volume
from ..engine.cleanup import edge_distance, shape_features
from ..engine.preprocessing import prepare
from ..engine.settings import DetectionSettings
from ..engine.volume import Volume, resample


@dataclass
class Case:
    """One scan on the working grid with its labels (one subject, one modality)."""

    name: str
    modality: str
    grid: np.ndarray            # 4x4 ijk_to_ras of the working grid
    image: np.ndarray           # float32
    frst: np.ndarray            # float32
    mask: np.ndarray            # bool
    labels: np.ndarray          # uint16, one label per CMB (0 = background)
    mimics: np.ndarray          # uint16 mimic labels (0 = none)
    mimic_types: dict           # mimic label -> type
    truth_centres: np.ndarray   # (N, 3) working-grid (k, j, i) of the true CMB centres

    @property
    def spacing_kji(self) -> np.ndarray:
        """Voxel size (mm) along the array axes (k, j, i), for distances between centres."""
        return np.linalg.norm(self.grid[:3, :3], axis=0)[::-1]

    def save(self, path) -> None:
        np.savez_compressed(path, grid=self.grid, image=self.image.astype(np.float16),
                            frst=self.frst.astype(np.float16), mask=self.mask,
                            labels=self.labels, mimics=self.mimics,
                            truth_centres=self.truth_centres,
                            meta=json.dumps({"name": self.name, "modality": self.modality,
                                             "mimic_types": self.mimic_types}))

    @classmethod
    def load(cls, path) -> "Case":
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        return cls(meta["name"], meta["modality"], z["grid"], z["image"].astype(np.float32),
                   z["frst"].astype(np.float32), z["mask"], z["labels"], z["mimics"],
                   {int(k): v for k, v in meta["mimic_types"].items()}, z["truth_centres"])


def labels_on_grid(labels: Volume, grid: Volume, centres_ras=()) -> np.ndarray:
    """Nearest-neighbour labels on ``grid``; every listed lesion keeps at least the voxel at its
    centre (a CMB thinner than a working voxel must not vanish from the targets)."""
    out = resample(labels.with_array(labels.array.astype(np.int32)), None, "nearest",
                   reference=grid).array.astype(np.uint16)
    if len(centres_ras):
        ijk = np.rint(grid.ras_to_ijk_points(np.asarray(centres_ras, float))).astype(int)
        present = set(np.unique(out).tolist())
        for n, c in enumerate(ijk, start=1):
            if n not in present and np.all((c >= 0) & (c < np.array(out.shape[::-1]))):
                out[c[2], c[1], c[0]] = n
    return out


def make_case(name: str, image: Volume, modality: str, cmb_labels: Volume,
              mimic_labels: Volume | None, truth: dict, settings: DetectionSettings,
              mask: Volume | None = None) -> Case:
    """Prepare one scan like inference does (a projection over slices reversed first, with
    ``settings.reverse_projection``) and bring its labels onto the working grid."""
    if settings.reverse_projection:
        from ..engine.projection import as_detected

        image = as_detected(image)[1]
    prep = prepare(image, modality, mask, settings)
    cmbs = truth.get("cmbs", [])
    # The label map numbers CMBs 1..n in truth order when the simulator wrote it; user masks
    # are relabelled by connected components (see finetune).
    centres = [c["centre_ras"] for c in cmbs]
    labels = labels_on_grid(cmb_labels, prep.grid, centres)
    mim = (labels_on_grid(mimic_labels, prep.grid) if mimic_labels is not None
           else np.zeros_like(labels))
    types = {int(m["id"]): str(m.get("type", "mimic")) for m in truth.get("mimics", [])}
    tc = (prep.grid.ras_to_ijk_points(np.asarray(centres, float))[:, ::-1] if centres
          else np.zeros((0, 3)))
    return Case(name, modality, prep.grid.ijk_to_ras, prep.image, prep.frst, prep.mask,
                labels, mim, types, tc)


# ----------------------------------------------------------------------------------------------
# Detector patches
# ----------------------------------------------------------------------------------------------
def _crop(arr: np.ndarray, centre, size: int, fill=0) -> np.ndarray:
    half = size // 2
    c = np.rint(centre).astype(int)
    lo = c - half
    out = np.full((size,) * 3, fill, arr.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, arr.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = \
        arr[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def detector_patches(case: Case, rng: np.random.Generator, size: int = 56, n_pos: int = 10,
                     n_rand: int = 6, n_mimic: int = 6, surface_mm: float = 0.0,
                     surface_extra: int = 0, context_fraction: float = 0.15,
                     context_extra: int = 0, large_voxels: int = 40, large_extra: int = 0):
    """Image and label patches (the FRST is recomputed after augmentation): centred near CMBs
    (jittered), at random brain locations, and on mimics, veins sampled along their course
    (hard negatives; see :func:`mimic_negatives`).

    A CMB whose centre lies within ``surface_mm`` of the brain-mask edge gets ``surface_extra``
    more (differently jittered) patches: near the surface, where SWI phase masking leaves dark
    bands and the mask cuts the context, the detector otherwise sees too few such lesions and
    missed large, obvious ones.

    A CMB in bright context (see :func:`bright_context`: more than ``context_fraction`` of its
    surroundings at paramagnetic-focus intensity, e.g. inside an SWI phase band or against a
    vein) gets ``context_extra`` more patches: the shipped detector missed 13 of the 14 large
    SWI CMBs it missed on validation in such context, and fired on 12 of them once that context
    was flattened.

    A CMB whose label has at least ``large_voxels`` voxels gets ``large_extra`` more patches:
    large CMBs are few (about 6 % of the validation CMBs), and on SWI the detector found 10 of
    15 of them (GRE 14 of 15). The large SWI misses touch the dark rim that SWI's phase mask
    leaves at the brain surface, whose fragments are negatives here (README, v18 and after).
    """
    centres, kinds = [], []
    if len(case.truth_centres):
        pick = rng.permutation(len(case.truth_centres))[:n_pos]
        lesions = list(pick)
        if surface_extra > 0 and surface_mm > 0:
            edge = edge_distance(case.mask, case.truth_centres[pick], case.spacing_kji[::-1])
            lesions += [p for p in pick[edge < surface_mm] for _ in range(surface_extra)]
        if context_extra > 0:
            lesions += [p for p in pick if bright_context(case, p) > context_fraction
                        for _ in range(context_extra)]
        if large_extra > 0:
            sizes = np.bincount(case.labels.ravel(), minlength=len(case.truth_centres) + 1)
            lesions += [p for p in pick if sizes[p + 1] >= large_voxels
                        for _ in range(large_extra)]
        for p in lesions:
            centres.append(case.truth_centres[p] + rng.integers(-12, 13, 3))
            kinds.append(1)
    brain = np.argwhere(case.mask[::4, ::4, ::4]) * 4
    if len(brain):
        for p in rng.choice(len(brain), size=min(n_rand, len(brain)), replace=False):
            centres.append(brain[p])
            kinds.append(0)
    for c in mimic_negatives(case, rng)[:n_mimic]:
        centres.append(c + rng.integers(-4, 5, 3))
        kinds.append(0)
    imgs = np.stack([_crop(case.image, c, size) for c in centres]) if centres else \
        np.zeros((0, size, size, size), np.float32)
    labs = np.stack([_crop((case.labels > 0).astype(np.uint8), c, size) for c in centres]) \
        if centres else np.zeros((0, size, size, size), np.uint8)
    return imgs.astype(np.float16), labs, np.array(kinds, np.int8)


def bright_context(case: Case, index: int, inner: int = 1, outer: int = 6,
                   level: float = 0.3) -> float:
    """Fraction of the brain voxels 1-6 voxels around CMB ``index`` (0-based) whose normalised
    intensity exceeds ``level`` (bright = dark on GRE/SWI, paramagnetic on QSM): how much the
    lesion touches other dark structures."""
    c = np.rint(case.truth_centres[index]).astype(int)
    box = tuple(slice(max(x - 16, 0), x + 17) for x in c)
    lesion = case.labels[box] == index + 1
    if not lesion.any():
        return 0.0
    shell = (ndi.binary_dilation(lesion, iterations=outer)
             & ~ndi.binary_dilation(lesion, iterations=inner) & case.mask[box])
    return float((case.image[box][shell] > level).mean()) if shell.any() else 0.0


# ----------------------------------------------------------------------------------------------
# Discriminator patches (out-of-fold candidates)
# ----------------------------------------------------------------------------------------------
def candidate_table(case: Case, detector, settings: DetectionSettings, across=None):
    """Run the detector on a case it never saw; return candidates with their truth status.

    A candidate is a CMB when its component overlaps a true CMB's label or its centroid lies
    within 2 mm of a true centre; otherwise it is a false positive, attributed to the mimic it
    overlaps (if any). ``across``: the case's projection axis, when it is an mIP, so the
    elongation is measured as ``detect()`` measures it (``cleanup.shape_features``).
    """
    channels = np.stack([case.image, case.frst])
    prob = predict_volume(detector, channels, settings.tile_size, settings.tile_overlap)
    labels, voxels, pmax, centres = extract_candidates(
        prob, settings.candidate_threshold, case.mask, settings.split_parameters(),
        tuple(case.spacing_kji))
    n = len(centres)
    spacing = case.spacing_kji[::-1]  # (i, j, k), as shape_features and edge_distance take
    vol, elong = shape_features(labels, n, spacing, across)
    edge = edge_distance(case.mask, centres, spacing)
    is_cmb = np.zeros(n, bool)
    mimic = [""] * n
    truth_hit = np.zeros(len(case.truth_centres), bool)
    if n:
        idx = np.arange(1, n + 1)
        overl = ndi.maximum(case.labels, labels, idx).astype(int)
        mim = ndi.maximum(case.mimics, labels, idx).astype(int)
        for c in range(n):
            hit = overl[c]
            if not hit and len(case.truth_centres):
                d = np.linalg.norm((case.truth_centres - centres[c]) * spacing[::-1], axis=1)
                if d.min() <= 2.0:
                    hit = int(np.argmin(d)) + 1
            if hit:
                is_cmb[c] = True
                truth_hit[hit - 1] = True
            elif mim[c]:
                mimic[c] = case.mimic_types.get(mim[c], "mimic")
    return {"centres": centres, "pmax": pmax, "voxels": voxels, "volume_mm3": vol,
            "elongation": elong, "edge_mm": edge, "is_cmb": is_cmb, "mimic": mimic,
            "truth_detected": truth_hit}


#: What a discriminator patch shows (the bank's ``kind``): a CMB, a false candidate on no
#: mimic, or one of the simulator's mimic types. Training may draw the mimics more often.
PATCH_KINDS = ("cmb", "other", "vein", "calcification", "iron", "air_dropout")


def kind_code(mimic_type: str) -> int:
    """:data:`PATCH_KINDS` index of a negative on ``mimic_type`` ("" or unknown: "other")."""
    return PATCH_KINDS.index(mimic_type) if mimic_type in PATCH_KINDS[2:] else 1


def discriminator_patches(case: Case, table: dict, rng: np.random.Generator, size: int = 24,
                          max_neg: int = 60):
    """Patches for the teacher/student: all detector candidates (negatives capped at
    ``max_neg``, hard ones first), every true CMB centre, and every mimic centre. Returns
    (x, seg, cls, kind), ``kind`` indexing :data:`PATCH_KINDS`."""
    centres, cls, kind = [], [], []
    c = table["centres"]
    pos = np.flatnonzero(table["is_cmb"])
    neg = np.flatnonzero(~table["is_cmb"])
    neg = neg[np.argsort(-table["pmax"][neg])][:max_neg]
    centres += [c[i] for i in pos] + [c[i] for i in neg]
    cls += [1] * len(pos) + [0] * len(neg)
    kind += [0] * len(pos) + [kind_code(table["mimic"][i]) for i in neg]
    centres += list(case.truth_centres)
    cls += [1] * len(case.truth_centres)
    kind += [0] * len(case.truth_centres)
    mimic_centres, mimic_kinds = typed_mimic_negatives(case, rng)
    centres += list(mimic_centres)
    cls += [0] * len(mimic_centres)
    kind += [kind_code(t) for t in mimic_kinds]
    if not centres:
        return (np.zeros((0, 2, size, size, size), np.float16),
                np.zeros((0, size, size, size), np.uint8), np.zeros(0, np.int8),
                np.zeros(0, np.int8))
    centres = np.array(centres, float)
    channels = np.stack([case.image, case.frst])
    x = extract_patches(channels, centres, size).astype(np.float16)
    seg = extract_patches((case.labels > 0).astype(np.float32)[None], centres, size)[:, 0]
    return x, seg.astype(np.uint8), np.array(cls, np.int8), np.array(kind, np.int8)


def mimic_negatives(case: Case, rng: np.random.Generator, per_vein: int = 3,
                    max_total: int = 40, min_dist_mm: float = 3.0):
    """Hard-negative centres on the mimics: each mimic's centre of mass plus random points
    *along* each vein (a curved vein's centre of mass can lie off the vein, and detectors fire
    anywhere along it), none within ``min_dist_mm`` of a true CMB."""
    return typed_mimic_negatives(case, rng, per_vein, max_total, min_dist_mm)[0]


def typed_mimic_negatives(case: Case, rng: np.random.Generator, per_vein: int = 3,
                          max_total: int = 40, min_dist_mm: float = 3.0) -> tuple:
    """:func:`mimic_negatives` and the mimic type of each centre (same draws from ``rng``)."""
    if not case.mimics.any():
        return np.zeros((0, 3)), []
    spacing = case.spacing_kji
    ids = np.unique(case.mimics)[1:]
    objs = ndi.find_objects(case.mimics.astype(np.int32))
    out = []
    for m in rng.permutation(ids):
        sl = objs[m - 1]
        if sl is None:
            continue
        pts = np.argwhere(case.mimics[sl] == m) + np.array([s.start for s in sl])
        picks = [pts.mean(0)]
        mtype = case.mimic_types.get(int(m), "mimic")
        if mtype == "vein":
            picks += list(pts[rng.choice(len(pts), min(per_vein, len(pts)), replace=False)])
        for c in picks:
            if len(case.truth_centres) and np.min(np.linalg.norm(
                    (case.truth_centres - c) * spacing, axis=1)) < min_dist_mm:
                continue
            out.append((np.asarray(c, float), mtype))
    order = rng.permutation(len(out))  # the same draw as shuffling the list in place
    out = [out[i] for i in order][:max_total]
    return np.array([c for c, _ in out]).reshape(-1, 3), [t for _, t in out]


def component_count(labels: np.ndarray) -> int:
    return int(ndi.label(labels > 0, STRUCTURE_26)[1])
