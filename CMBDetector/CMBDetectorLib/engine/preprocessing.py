"""Input checks, working grid, brain mask and polarity-aware intensity normalisation.

The networks see one convention whatever the modality: an isotropic working grid of
``working_spacing_mm`` in the scan's own orientation, brain tissue near 0 and paramagnetic foci
(CMBs) positive. GRE/SWI are inverted (CMBs are dark there); QSM keeps its sign, so
diamagnetic sources (calcifications) stay negative and distinguishable.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .. import MODALITIES
from ..errors import InputError
from .volume import Volume, resample

#: Smallest field of view (mm) along every axis that detection accepts (one student patch).
MIN_EXTENT_MM = 24.0


def check_modality(modality: str) -> str:
    m = str(modality).strip().lower()
    aliases = {"t2*": "gre", "t2star": "gre", "t2starw": "gre", "t2*-gre": "gre", "gre": "gre",
               "swi": "swi", "qsm": "qsm", "chimap": "qsm"}
    if m not in aliases:
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    return aliases[m]


def check_volume(volume: Volume, what: str = "scan") -> None:
    """Reject what detection cannot use, with one line naming the problem."""
    a = volume.array
    name = volume.name or what
    if a.ndim != 3:
        raise InputError(f"{name}: expected a 3D scalar volume, got {a.ndim} dimensions "
                         f"with shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise InputError(f"{name}: voxel type {a.dtype} is not a scalar number type")
    if a.size == 0:
        raise InputError(f"{name}: the volume is empty")
    extent = np.array(a.shape[::-1]) * volume.spacing
    if np.any(extent < MIN_EXTENT_MM):
        raise InputError(f"{name}: field of view {np.round(extent, 1).tolist()} mm is smaller "
                         f"than the {MIN_EXTENT_MM:.0f} mm patch along some axis")
    finite = np.isfinite(a) if a.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        bad = int((~finite).sum())
        raise InputError(f"{name}: {bad} voxels are NaN or Inf")
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi - lo <= 0:
        raise InputError(f"{name}: the volume is constant ({lo:g}); nothing to detect")
    if np.linalg.matrix_rank(volume.ijk_to_ras[:3, :3]) < 3:
        raise InputError(f"{name}: degenerate geometry (singular direction/spacing)")


def check_mask(mask: Volume, volume: Volume) -> None:
    if mask.array.shape != volume.array.shape or not mask.same_grid(volume, tol=1e-2):
        raise InputError(f"mask {mask.name or ''} is on another grid than the scan "
                         f"(shape {mask.array.shape} vs {volume.array.shape}); resample it first"
                         .replace("mask  is", "mask is"))
    if not np.any(mask.array > 0):
        raise InputError("the brain mask is empty")


def _ball(radius_vox: float) -> np.ndarray:
    r = int(np.ceil(radius_vox))
    z, y, x = np.ogrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (x * x + y * y + z * z) <= radius_vox * radius_vox + 1e-6


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    pad = [(0, (-s) % f) for s in a.shape]
    a = np.pad(a, pad, mode="edge")
    k, j, i = (s // f for s in a.shape)
    return a.reshape(k, f, j, f, i, f).mean(axis=(1, 3, 5))


def brain_mask(array: np.ndarray, spacing_mm: float, modality: str,
               closing_mm: float = 0.0, threshold: str = "intensity") -> np.ndarray:
    """A brain mask from the scan itself (no FSL), on an isotropic grid of ``spacing_mm``.

    QSM maps are already masked by their reconstruction (zeros outside the brain), so the
    non-zero support is used. For magnitude images (GRE, SWI): a foreground threshold, an
    erosion of 5 mm that cuts the brain from scalp and skull, the largest component, the
    dilation back, then hole filling (dark lesions and ventricles stay inside). ``threshold``
    ``intensity`` (the bundled models'): 0.6 x the Otsu threshold of the intensity, which
    follows the scanner's intensity curve. ``log``: the Otsu threshold of the log intensity,
    where a gamma or a gain is affine, so that the floor, smoothing and threshold all move with
    it and the mask follows the anatomy (on simulated subjects a gamma of 0.7 or 1.4 changes
    0-0.13 % of the mask's voxels, against 1-7 % with ``intensity``). ``closing_mm`` > 0 first
    closes the image (grey scale), so that dark bands thinner than that (SWI's darkened
    cortical rim, sulcal veins) no longer cut tissue out of the foreground. The morphology runs
    on a ~2 mm grid for speed and is upsampled. Good enough to bound the search and to measure
    edge distance; pass a proper mask when you have one.
    """
    a = np.asarray(array, np.float32)
    f = max(1, int(round(2.0 / spacing_mm)))
    if modality == "qsm":
        support = a != 0
        if support.mean() < 0.95:
            coarse = _block_mean(support.astype(np.float32), f) > 0.5
            sp = spacing_mm * f
            m = _largest_component(ndi.binary_opening(coarse, _ball(1.0 / sp)))
            return _upsample(_fill(m), f, a.shape) & ndi.binary_closing(support, _ball(1.0))
        a = np.abs(a - np.median(a))
    log = threshold == "log"
    coarse = _block_mean(_log_magnitude(a) if log else a, f)
    sp = spacing_mm * f
    if closing_mm > 0:
        coarse = ndi.grey_closing(coarse, footprint=_ball(closing_mm / sp))
    sm = ndi.gaussian_filter(coarse, 1.0 / sp)
    sample = sm.ravel()
    t = _otsu(sample[sample > np.percentile(sample, 2)])
    fg = sm > (t if log else 0.6 * t)
    r = 5.0 / sp
    core = ndi.binary_erosion(fg, _ball(r))
    if not core.any():
        core = fg
    core = _largest_component(core)
    m = ndi.binary_dilation(core, _ball(r)) & fg
    m = ndi.binary_closing(m, _ball(2.0 / sp))
    return _upsample(_fill(m), f, a.shape)


def _log_magnitude(a: np.ndarray) -> np.ndarray:
    """log of a magnitude image, floored at the 1st percentile of its positive values (the
    floor is a quantile, so it moves with any monotone change of the intensities)."""
    pos = a[a > 0]
    floor = float(np.percentile(pos, 1)) if pos.size else 1.0
    return np.log(np.maximum(a, floor)).astype(np.float32)


def _upsample(m: np.ndarray, f: int, shape) -> np.ndarray:
    if f == 1:
        return m
    up = m.repeat(f, 0).repeat(f, 1).repeat(f, 2)
    return up[:shape[0], :shape[1], :shape[2]]


def _fill(m: np.ndarray) -> np.ndarray:
    m = ndi.binary_fill_holes(m)
    for axis in range(3):  # slice-wise filling catches ventricles open to one side
        m = np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(m, axis, 0)], axis=0)
        m = np.moveaxis(m, 0, axis)
    return m


#: ``iqr`` scaling: this many interquartile ranges of brain tissue map to 1 (about what the
#: percentile scaling gave on the simulator's MNI152 scans: 2.1-4.9 IQR there, varying with the
#: scan's vein content).
IQR_UNITS = 3.5
#: ``quantile`` normalisation: brain percentiles (of the polarity-corrected image) that are
#: mapped to fixed values; dense in the tails, where foci and veins lie.
QUANTILE_LANDMARKS = np.array([0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0,
                               98.0, 99.0, 99.5, 99.9])


def _standard_quantiles(percentiles: np.ndarray) -> np.ndarray:
    """Normal quantiles scaled so that the interquartile range spans ``1 / IQR_UNITS``, the
    tissue scale of ``iqr`` normalisation (the networks' augmentation assumes that scale)."""
    from scipy.special import ndtri

    return ndtri(percentiles / 100.0) / (IQR_UNITS * 2.0 * float(ndtri(0.75)))


def quantile_map(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of ``values`` that sends the brain's landmark percentiles
    (``inside``: the brain's values) to fixed standard values, extrapolated linearly beyond the
    end landmarks. Any monotone intensity change (a gamma, another scanner's curve) moves the
    landmarks with the voxels, so the result changes only by the curve's bend between two
    landmarks (the Nyul-Udupa histogram standardisation, with normal quantiles as the scale)."""
    src = np.percentile(inside, QUANTILE_LANDMARKS).astype(np.float64)
    span = max(float(src[-1] - src[0]), 1e-6)
    src = src + np.arange(len(src)) * 1e-9 * span  # ties (a plateau) -> strictly increasing
    dst = _standard_quantiles(QUANTILE_LANDMARKS)
    v = values.astype(np.float64)
    out = np.interp(v, src, dst)
    lo_slope = (dst[1] - dst[0]) / (src[1] - src[0])
    hi_slope = (dst[-1] - dst[-2]) / (src[-1] - src[-2])
    below, above = v < src[0], v > src[-1]
    out[below] = dst[0] + (v[below] - src[0]) * lo_slope
    out[above] = dst[-1] + (v[above] - src[-1]) * hi_slope
    return out


def normalise(array: np.ndarray, mask: np.ndarray, modality: str,
              method: str = "percentile") -> np.ndarray:
    """Robust, polarity-corrected scaling: brain median -> 0, paramagnetic foci positive.

    ``percentile``: GRE/SWI ``(median - I) / (median - p0.5)``, QSM
    ``(I - median) / (p99.5 - median)``: strong foci -> ~1, but the scale follows the darkest
    (brightest) half percent of the brain, i.e. the scan's veins. ``iqr``: the same polarity,
    divided by ``IQR_UNITS`` interquartile ranges of the brain's intensities, which veins and
    lesions (a few percent of the voxels) barely move, so a clinical QSM with few bright veins
    is not amplified. ``quantile``: the polarity-corrected brain histogram mapped onto a fixed
    one (:func:`quantile_map`), so a monotone intensity change of the scan barely moves it.
    Diamagnetic values stay negative. Clipped to [-3, 3]; zero outside the brain.
    """
    a = np.asarray(array, np.float32)
    inside = a[mask]
    if inside.size < 100:
        raise InputError("the brain mask covers fewer than 100 voxels")
    sign = -1.0 if modality in ("gre", "swi") else 1.0
    if method == "quantile":
        out = quantile_map(sign * a, sign * inside)
    else:
        med = float(np.median(inside))
        if method == "iqr":
            q25, q75 = np.percentile(inside, [25.0, 75.0])
            scale = IQR_UNITS * float(q75 - q25)
        elif modality in ("gre", "swi"):
            scale = med - float(np.percentile(inside, 0.5))
        else:
            scale = float(np.percentile(inside, 99.5)) - med
        out = sign * (a - med) / max(scale, 1e-6)
    out = np.clip(out, -3.0, 3.0)
    out[~mask] = 0.0
    return out.astype(np.float32)


@dataclass
class Prepared:
    """The scan on the working grid, ready for the networks."""

    grid: Volume               # working-grid geometry; ``grid.array`` is the normalised image
    image: np.ndarray          # float32 [k, j, i], polarity-corrected
    frst: np.ndarray           # float32, radial symmetry of ``image``
    mask: np.ndarray           # bool brain mask on the working grid
    modality: str


def to_working_grid(volume: Volume, spacing_mm: float, interpolator: str = "linear") -> Volume:
    vol = volume if volume.array.dtype == np.float32 or interpolator == "nearest" else \
        volume.with_array(volume.array.astype(np.float32))
    return resample(vol, spacing_mm, interpolator)


def crop_box(mask: np.ndarray, margin: int, min_size: int) -> tuple:
    """Bounding box of ``mask`` grown by ``margin`` voxels and to at least ``min_size``."""
    idx = np.argwhere(mask)
    lo = idx.min(0) - margin
    hi = idx.max(0) + 1 + margin
    for ax in range(3):
        short = min_size - (hi[ax] - lo[ax])
        if short > 0:
            lo[ax] -= short // 2 + 1
            hi[ax] += short - short // 2 + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def crop_volume(vol: Volume, box: tuple) -> Volume:
    """Sub-volume with its geometry (origin moved to the box corner)."""
    offset_ijk = np.array([box[2].start, box[1].start, box[0].start], float)
    m = vol.ijk_to_ras.copy()
    m[:3, 3] = vol.ijk_to_ras_points(offset_ijk)[0]
    return Volume(np.ascontiguousarray(vol.array[box]), m, vol.name, dict(vol.metadata))


def prepare(volume: Volume, modality: str, mask: Volume | None, settings,
            device=None) -> Prepared:
    """Resample to the working grid, mask, crop to the brain, normalise, compute the FRST
    (with torch on ``device`` when one is given, see :mod:`.radial_symmetry_torch`; numpy
    otherwise, which is faster on a CPU: 1.0 s against 4.9 s for a 144x204x174 brain)."""
    from .radial_symmetry import frst

    modality = check_modality(modality)
    check_volume(volume)
    if mask is not None:
        check_mask(mask, volume)
    sp = float(settings.working_spacing_mm)
    work = to_working_grid(volume, sp)
    if mask is not None:
        m = to_working_grid(mask.with_array((mask.array > 0).astype(np.float32)), sp)
        bm = m.array > 0.5
    else:
        bm = brain_mask(work.array, sp, modality, float(settings.mask_closing_mm),
                        getattr(settings, "mask_threshold", "intensity"))
    if bm.sum() * sp ** 3 < 1000.0:  # < 1 cm^3: nothing brain-like was found
        raise InputError(f"{volume.name or 'scan'}: no brain found (mask under 1 cm^3); "
                         "is this a brain scan? pass --mask")
    box = crop_box(bm, margin=int(round(8 / sp)), min_size=int(np.ceil(MIN_EXTENT_MM / sp)))
    work = crop_volume(work, box)
    bm = np.ascontiguousarray(bm[box])
    img = normalise(work.array, bm, modality, getattr(settings, "normalisation", "percentile"))
    if device is None:
        fr = frst(img, spacing_mm=(sp, sp, sp), radii_mm=settings.frst_radii_mm,
                  alpha=settings.frst_alpha)
    else:
        from .radial_symmetry_torch import frst_torch

        fr = frst_torch(img, spacing_mm=(sp, sp, sp), radii_mm=settings.frst_radii_mm,
                        alpha=settings.frst_alpha, device=device)
    fr[~bm] = 0.0
    return Prepared(work.with_array(img), img, fr, bm, modality)
