"""Physics-based simulator of GRE / SWI / QSM scans with cerebral microbleeds and their mimics.

Why: no annotated CMB data can be obtained here, so the detector is trained and tested on these
subjects. The appearance of a CMB (blooming that grows with TE and B0, dipolar phase, positive
QSM blob) must come from the physics, and the mimics that fool detectors (veins, calcifications,
deep-nuclei iron, air/bone dropout) must be present.

Design (fast enough for bulk training data: ~1 mm whole brain in seconds on 2 cores)
--------------------------------------------------------------------------------------
1. **Anatomy.** MNI152 2009 templates (nilearn wheel, see :mod:`anatomy`), warped per subject by
   scaling, rotation, shift and a smooth random displacement. Tissue fractions (GM, WM, CSF,
   deep nuclei, skull, scalp, sinuses) are sampled on a *field grid* F: the target grid's
   orientation, spacing ``max(target, field_min_mm)``, field of view = target + margin.
2. **Extended sources on F.** Tissue chi (relative to air, so the zero padding is air), deep-nuclei
   iron, bone, and vein trees (pial, medullary, deep veins / sinuses, short slice-crossing
   segments) rasterised with an area-preserving partial-volume profile. Field
   dB/B0 = IFFT(D(k) FFT(chi)), D = 1/3 - (k.b)^2/|k|^2 with B0 direction b in the grid frame
   (zero-padded, Lorentz-corrected), then a linear shim over the brain.
3. **Signal on the target grid T.** s = M0 exp(-TE R2*) exp(-i gamma dB TE) per voxel, with the
   intravoxel dephasing of the smooth field taken exactly for a linear phase ramp across the
   voxel box (product of sinc(grad phase * voxel size / 2) along the three voxel axes: dropout near
   sinuses, extra darkening next to veins), and veins' own blood signal by volume fraction.
4. **Compact sources (CMBs, calcifications) on a fine grid.** For each, a local box of target
   voxels is subdivided to <= ``fine_mm`` (default 0.25 mm, never coarser than 0.5 mm); the exact
   external field of the (equivalent) sphere, dB/B0 = chi a^3/3 (3cos^2 theta - 1)/r^3, zero
   inside, and the lesion's own (near-zero) signal are evaluated on the sub-voxels and the complex
   signal is averaged down to each target voxel. The voxel's signal is multiplied by this complex
   factor, so blooming arises from intravoxel dephasing and grows with TE, B0 and chi*V. The box
   extends until the pole phase falls below ~0.15 rad.
5. **Images.** Complex Gaussian noise (=> Rician magnitude) and a smooth bias field; GRE =
   |s|; SWI = |s| * mask^4 with the homodyne high-pass phase (complex division by a Gaussian
   low-pass, sigma ``homodyne_sigma_mm``), mask = (pi + phi)/pi for phi < 0; QSM = chi (relative
   to CSF) blurred like a reconstruction, plus noise, inside the brain.

Pipeline: ``simulate_subject`` runs the stages of ``PIPELINE`` (protocol, geometry, iron,
anatomy, tissue, veins, air, field, signal, cmbs, calcifications, labels, acquisition, gre, swi,
qsm, truth) on one :class:`SimState`; each gets only its own ``SimulationConfig`` fields
(``STAGE_FIELDS``), so a variant touches one stage. The order is also the order of the random
draws, so changing it changes every seed's subject; ``run_stages(..., until=name)`` stops early
(tests, inspection).

Phase convention: phase = -gamma dB TE, so paramagnetic sources (CMBs, veins along B0) give
negative high-pass phase at their poles and are darkened by the negative-phase mask;
diamagnetic calcifications give the opposite sign.

Ground truth: ``cmb_labels`` marks each CMB's visible (bloomed) footprint on the GRE image
(voxels whose magnitude is attenuated by >= 40 % by that source, plus the centre voxel), with
the true radius/chi in ``truth``; ``mimic_labels`` marks veins (vein fraction >= 0.3),
calcifications, iron-laden nuclei and the air-dropout region with the ids of ``truth['mimics']``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..engine.volume import Volume, write_volume

GAMMA_HZ_PER_T = 42.577478e6
CHI_TISSUE_VS_AIR = -9.4  # ppm, water/tissue relative to air
MODALITIES = ("gre", "swi", "qsm")


@dataclass
class SimulationConfig:
    """Knobs of one simulated subject. ``None`` means: draw at random from the realistic range.

    Flat for compatibility; STAGE_FIELDS says which pipeline stage owns each field."""

    roi_mm: float | tuple | None = None  # crop: cube / box (mm) of the field of view; None = brain
    roi_center_mni: tuple | None = None  # centre of the crop in template MNI mm (None = random)
    spacing_mm: tuple | None = None  # (in-plane, in-plane, slice) mm; None: 0.45-1 x 0.6-3
    min_voxel_mm3: float = 0.25  # random spacings below this voxel volume are redrawn (speed)
    te_ms: float | None = None  # 15-40
    b0_t: float | None = None  # 1.5 or 3
    b0_dir: tuple = (0.0, 0.0, 1.0)  # B0 direction in subject RAS
    oblique_deg: float = 15.0  # max rotation of the image grid; 0 = axis-aligned
    flip_axes: bool = True  # randomly store i/j flipped (LPS-like) to exercise geometry
    deform: bool = True  # per-subject scaling/rotation/smooth deformation of the template
    deform_mm: float = 3.0
    n_cmbs: int | tuple | None = None  # exact count or (lo, hi); None: heavy-tailed 0..20
    cmb_specs: list | None = None  # explicit CMBs: dicts centre_ras, radius_mm, chi_ppm
    calc_specs: list | None = None  # explicit calcifications (chi < 0)
    cmb_radius_mm: float | None = None  # fixed true radius for random CMBs
    cmb_chi_ppm: float | None = None
    #: Share of random CMBs placed in dark context: centred 0.5-3 mm from a structure that the
    #: lesion-free SWI shows dark (a vein, a phase band, an iron-laden nucleus). Training pools
    #: use it so the detector sees enough CMBs touching a dark band; 0 keeps the natural
    #: placement (and the random stream) of the test split.
    cmb_dark_context: float = 0.0
    #: Rater criterion (Greenberg et al. 2009: CMBs of roughly 2-10 mm on the image): a random
    #: CMB whose attenuated footprint on the GRE has an equivalent-sphere diameter under this
    #: (mm) is redrawn, so no CMB too faint for the scan's TE, field and voxel size is placed
    #: and labelled. 0 places every drawn source (labelled at least by its centre voxel).
    min_visible_diameter_mm: float = 0.0
    veins: bool = True
    vein_density: float = 1.5  # scales the number of pial, medullary and slice-crossing veins
    calcifications: bool = True
    iron: bool = True
    air: bool = True  # air/bone susceptibility (sinuses, skull)
    noise: bool = True
    bias: bool = True
    snr: float | None = None  # WM signal / noise sigma; None: 25-60
    fine_mm: float = 0.25  # sub-voxel spacing for compact sources (<= 0.5)
    field_min_mm: float = 1.0  # finest spacing of the field grid
    margin_mm: float = 12.0  # field-grid margin beyond the target field of view
    homodyne_sigma_mm: float = 3.0
    swi_power: int = 4
    qsm_blur_vox: float = 0.6
    scale: float = 500.0  # GRE intensity of white matter (arbitrary units)
    # --- anatomy variants (issue 25): fields below this line, above the next marker ---
    #: Brain the subject is made from: "mni152" (the template), a name of
    #: ``anatomies.SOURCES`` (a real brain, built once and cached), or "random" (one of mni152
    #: and the installed ones, drawn from the subject's random stream).
    anatomy: str = "mni152"
    # --- appearance variants (issue 25): fields below this line, above the next marker ---
    #: Appearance knobs (appearance.py; docs/simulation.md "Appearance variants"). Each default
    #: reproduces the simulator's output bit for bit; "random" draws the knob per subject from
    #: its own generator (appearance.family_rng), never from the main stream;
    #: appearance.RANDOM_APPEARANCE sets every knob to "random".
    gre_weighting: str = "t2star"  # "t2star" | "2d_long_tr" | "3d_spoiled" | "mixed" | "random"
    gfactor: float | str = 0.0  # parallel-imaging noise amplification: g = 1 .. 1 + gfactor
    bias_strength: float | str = 1.0  # multiplies the log bias field
    gibbs: float | str = 0.0  # share of in-plane k-space cut (ringing), 0-0.35
    ghosting: float | str = 0.0  # phase-encode ghost amplitude (N/2 or motion-like), 0-0.06
    texture: float | str = 0.0  # std of the small-scale multiplicative brain texture, 0-0.06
    swi_filter: str = "gaussian"  # homodyne low-pass: "gaussian" (3D) | "hann" (2D k-space)
    swi_mask: str = "negative"  # phase mask: "negative" | "positive" | "both"
    swi_mip: int | str = 0  # minimum-intensity projection over this many slices (0: none)
    qsm_recon: str = "current"  # "current" (blurred chi) | "tkd" | "tikhonov" | "random"
    qsm_background: float | str = 0.0  # residual background field left in (ppm of field)
    qsm_scale: float | str = 1.0  # multiplies the QSM (ppm scale of the reconstruction)
    qsm_offset_ppm: float | str = 0.0  # added inside the brain (reference region)
    swi_filter_width: float | str | None = None  # homodyne width (mm); None: homodyne_sigma_mm
    # --- lesion prior (issue 25): fields below this line, above def block ---
    #: Random CMB size (lesions.py): "legacy" (log-normal chi*V, the default), "real" (visible
    #: diameter log-normal like the real datasets, tail to 10 mm) or "training" (a fifth drawn
    #: 5-10 mm so large CMBs are learnt). Non-legacy options draw from lesions.lesion_rng.
    cmb_size_prior: str = "legacy"
    cmb_shape: str = "ellipsoid"  # "ellipsoid" | "irregular" (2-3 lobes) | "random" (half each)
    cmb_cluster_prob: float = 0.0  # chance that a random CMB seeds a cluster of 2-5 (5-15 mm)
    cmb_touch_prob: float = 0.0  # share of random CMBs moved to touch a vein or the cortex
    calc_size_prior: str = "legacy"  # calcifications: "legacy" or a visible-diameter prior

    def block(self, stage: str) -> SimpleNamespace:
        """The fields ``stage`` may read (STAGE_FIELDS plus STAGE_BORROWS) as a namespace;
        reading any other field raises AttributeError."""
        names = STAGE_FIELDS[stage] + STAGE_BORROWS.get(stage, ())
        return SimpleNamespace(**{n: getattr(self, n) for n in names})


#: Which pipeline stage reads which :class:`SimulationConfig` field; every field has exactly one
#: owner. The configuration stays flat (training configs and docs/experiments/*.json pass these
#: names as keyword arguments, and ``config_to_dict`` must not change), but each stage receives
#: only its block (:meth:`SimulationConfig.block`), so a variant of one stage cannot silently
#: depend on another stage's knob. What a stage needs from an earlier one travels in the state.
STAGE_FIELDS = {
    "protocol": ("te_ms", "b0_t", "b0_dir", "spacing_mm", "min_voxel_mm3", "snr"),
    "geometry": ("roi_mm", "roi_center_mni", "oblique_deg", "flip_axes", "deform", "deform_mm",
                 "field_min_mm", "margin_mm"),
    "iron": ("iron",),
    "anatomy": ("anatomy",),
    "tissue": (),
    "veins": ("veins", "vein_density"),
    "air": ("air",),
    "field": (),
    "signal": ("fine_mm", "gre_weighting"),
    "cmbs": ("n_cmbs", "cmb_specs", "cmb_radius_mm", "cmb_chi_ppm", "cmb_dark_context",
             "min_visible_diameter_mm", "cmb_size_prior", "cmb_shape", "cmb_cluster_prob",
             "cmb_touch_prob"),
    "calcifications": ("calcifications", "calc_specs", "calc_size_prior"),
    "labels": (),
    "acquisition": ("noise", "bias", "scale", "gfactor", "bias_strength", "gibbs", "ghosting",
                    "texture"),
    "gre": (),
    "swi": ("homodyne_sigma_mm", "swi_power", "swi_filter", "swi_mask", "swi_mip",
            "swi_filter_width"),
    "qsm": ("qsm_blur_vox", "qsm_recon", "qsm_background", "qsm_scale", "qsm_offset_ppm"),
    "truth": (),
}
#: Fields a stage reads besides its own: dark-context CMB placement looks at the lesion-free
#: SWI, which must be made exactly as the SWI stage makes it.
STAGE_BORROWS = {"cmbs": ("homodyne_sigma_mm", "swi_power")}


@dataclass
class SimulatedSubject:
    images: dict
    cmb_labels: Volume
    mimic_labels: Volume
    brain_mask: Volume
    truth: dict
    phase: Volume | None = None  # homodyne high-pass phase (rad), for inspection and tests
    timings: dict = field(default_factory=dict)
    #: CMB labels as the SWI shows them: the GRE label plus each CMB's SWI footprint (see
    #: ``_swi_footprints``); the SWI's phase mask also darkens a CMB's lobes along B0.
    swi_cmb_labels: Volume | None = None


# ----------------------------------------------------------------------------------------------
# grids
class _Grid:
    """Voxel grid: array axes (i, j, k), centres at origin + D diag(spacing) ijk."""

    def __init__(self, shape, spacing, direction, origin):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, float)
        self.direction = np.asarray(direction, float)
        self.origin = np.asarray(origin, float)

    @property
    def affine(self):
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing
        m[:3, 3] = self.origin
        return m

    def to_ras(self, ijk):
        return np.asarray(ijk, float) @ (self.direction * self.spacing).T + self.origin

    def to_ijk(self, ras):
        return (np.asarray(ras, float) - self.origin) @ self.direction / self.spacing

    def volume(self, arr_ijk, name=""):
        """Wrap an (i, j, k) array as a :class:`Volume` ([k, j, i])."""
        return Volume(np.ascontiguousarray(np.transpose(arr_ijk, (2, 1, 0))), self.affine, name)


def _resample_axes(arr, scale, offset, out_shape, order=1):
    """Sample ``arr`` at index ``scale * t + offset`` per axis (grids sharing their direction):
    separable linear (or nearest) interpolation, edge-clamped; much faster than a general
    affine resampler because each pass is a 1D gather."""
    out = arr
    for a in range(3):
        x = np.arange(out_shape[a], dtype=np.float64) * scale[a] + offset[a]
        n = out.shape[a]
        if order == 0:
            idx = np.clip(np.round(x).astype(int), 0, n - 1)
            out = np.take(out, idx, axis=a)
            continue
        x = np.clip(x, 0, n - 1)
        i0 = np.minimum(np.floor(x).astype(int), max(n - 2, 0))
        w = (x - i0).astype(np.float32)
        i1 = np.minimum(i0 + 1, n - 1)
        shp = [1, 1, 1]
        shp[a] = -1
        w = w.reshape(shp)
        lo = np.take(out, i0, axis=a)
        out = lo + (np.take(out, i1, axis=a) - lo) * w
    return out


def _smooth_lowres(arr, sigma_mm, spacing, target_mm=1.5):
    """Gaussian low-pass of a (complex) volume computed on a block-averaged grid and
    interpolated back: the homodyne filter is smooth, so this costs far less than filtering at
    full resolution with wide kernels."""
    from scipy import ndimage as ndi

    f = np.maximum(1, np.floor(target_mm / np.asarray(spacing)).astype(int))
    shp = np.array(arr.shape)
    if np.all(f == 1):
        out = ndi.gaussian_filter(arr.real, sigma_mm / spacing)
        return out + 1j * ndi.gaussian_filter(arr.imag, sigma_mm / spacing)
    m = -(-shp // f) * f
    pad = np.pad(arr, [(0, m[a] - shp[a]) for a in range(3)], mode="edge")
    small = pad.reshape(m[0] // f[0], f[0], m[1] // f[1], f[1], m[2] // f[2], f[2]).mean(
        axis=(1, 3, 5))
    sg = sigma_mm / (np.asarray(spacing) * f)
    small = ndi.gaussian_filter(small.real, sg) + 1j * ndi.gaussian_filter(small.imag, sg)
    # fine voxel t has centre at block coordinate (t + 0.5) / f - 0.5
    return _resample_axes(small.astype(np.complex64), 1.0 / f, 0.5 / f - 0.5, tuple(shp))


def _rotation(rng, max_deg):
    if max_deg <= 0:
        return np.eye(3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k


# ----------------------------------------------------------------------------------------------
# anatomy sampling
def _template_coords(grid: _Grid, warp, tpl, dk=0.0):
    """Template index coordinates (3, Ni, Nj, Nk) of the grid's voxel centres, shifted by ``dk``
    voxels along k. The affine part and each sinusoidal displacement mode are separable in the
    voxel indices, so this costs a few broadcast multiply-adds per voxel (no interpolation)."""
    ni, nj, nk = grid.shape
    m = grid.direction * grid.spacing
    o = grid.origin + m[:, 2] * dk
    # template index = L (x - c0 - shift) + c0 + u(x) - tpl.origin, x = o + m ijk
    L = warp.lin_inv
    base = L @ (o - warp.c0 - warp.shift) + warp.c0 - tpl.origin
    Lm = L @ m
    ii = np.arange(ni, dtype=np.float32)
    jj = np.arange(nj, dtype=np.float32)
    kk = np.arange(nk, dtype=np.float32)
    out = np.empty((3, ni, nj, nk), np.float32)
    for a in range(3):
        out[a] = ((Lm[a, 0] * ii + base[a])[:, None, None] + (Lm[a, 1] * jj)[None, :, None]
                  + (Lm[a, 2] * kk)[None, None, :])
    for kv, ph, amp in warp.modes:
        w = 2 * np.pi * (m.T @ kv)  # phase increment per voxel along i, j, k
        p0 = 2 * np.pi * float(o @ kv) + ph
        aij = (w[0] * ii[:, None] + w[1] * jj[None, :] + p0).astype(np.float32)
        bk = (w[2] * kk).astype(np.float32)
        sa, ca = np.sin(aij)[:, :, None], np.cos(aij)[:, :, None]
        sinv = sa * np.cos(bk)[None, None, :] + ca * np.sin(bk)[None, None, :]
        for a in range(3):
            if amp[a] != 0:
                out[a] += np.float32(amp[a]) * sinv
    return out


def _sample_anatomy(grid: _Grid, warp, tpl, iron_values=None):
    """Tissue fractions on ``grid`` (partial volume across thick slices by sub-sampling).

    Only points near the brain are sampled for GM/WM/brain, only points near the sinuses for the
    sinus map: most of a head-sized box is outside the brain.
    """
    from scipy import ndimage as ndi

    n_sub = max(1, int(math.ceil(grid.spacing[2] / 1.0 - 0.3)))
    offs = [((s + 0.5) / n_sub - 0.5) for s in range(n_sub)]
    shp = grid.shape
    acc = {k: np.zeros(shp, np.float32) for k in ("gm", "wm", "brain", "sinus", "rim", "bone",
                                                   "scalp", "hull")}
    nuclei = None
    sin_lo = np.argwhere(tpl.sinus > 0.01).min(0) - 1
    sin_hi = np.argwhere(tpl.sinus > 0.01).max(0) + 1
    tshape = np.array(tpl.brain.shape)
    for si, dk in enumerate(offs):
        c = _template_coords(grid, warp, tpl, dk)
        d = ndi.map_coordinates(tpl.d_out, c, order=1, mode="nearest", prefilter=False)
        inside_t = np.ones(shp, bool)
        for a in range(3):
            inside_t &= (c[a] >= 0) & (c[a] <= tshape[a] - 1)
        d[~inside_t] = 100.0
        w = np.float32(1.0 / n_sub)
        # CSF fills whatever is not brain up to 3 mm outside the closed hull, the holes and
        # fissures inside it included: gating it to d > -0.5 left a shell of air (M0 ~0, -9.4
        # ppm) wherever the interpolated d jumps from deep inside the brain to a hole's 0
        acc["rim"] += w * np.clip(3.0 - d, 0, 1)
        acc["hull"] += w * np.clip(1.0 - d, 0, 1)
        acc["bone"] += w * np.clip(d - 2.0, 0, 1) * np.clip(9.5 - d, 0, 1)
        acc["scalp"] += w * np.clip(d - 9.0, 0, 1) * np.clip(14.5 - d, 0, 1)
        near = d < 1.5
        cn = c[:, near]
        for name in ("gm", "wm", "brain"):
            acc[name][near] += w * ndi.map_coordinates(getattr(tpl, name), cn, order=1,
                                                        mode="constant", prefilter=False)
        ns = near.copy()
        ns[:] = True
        for a in range(3):
            ns &= (c[a] >= sin_lo[a]) & (c[a] <= sin_hi[a])
        if np.any(ns):
            acc["sinus"][ns] += w * ndi.map_coordinates(tpl.sinus, c[:, ns], order=1,
                                                         mode="constant", prefilter=False)
        nl = tpl.nuclei_lo
        nh = nl + np.array(tpl.nuclei_frac.shape[1:]) - 1
        inn = near.copy()
        for a in range(3):
            inn &= (c[a] >= nl[a]) & (c[a] <= nh[a])
        if np.any(inn) and iron_values is not None:
            if "iron" not in acc:
                acc["iron"] = np.zeros(shp, np.float32)
            cc = c[:, inn] - nl[:, None].astype(np.float32)
            part = np.zeros(cc.shape[1], np.float32)
            for q in range(len(tpl.nuclei_frac)):
                part += np.float32(iron_values[q]) * ndi.map_coordinates(
                    tpl.nuclei_frac[q], cc, order=1, mode="constant", prefilter=False)
            acc["iron"][inn] += w * part
        if si == len(offs) // 2:
            nuclei = np.zeros(shp, np.uint8)
            nuclei[near] = ndi.map_coordinates(tpl.nuclei, cn, order=0, mode="constant",
                                               prefilter=False)
        del c, d, cn
    brain = np.clip(acc["brain"], 0, 1)
    gm = np.minimum(acc["gm"], brain)
    wm = np.minimum(acc["wm"], np.clip(brain - gm, 0, 1))
    csf = np.clip(brain - gm - wm, 0, 1)
    outside = 1 - brain
    sinus = np.clip(acc["sinus"], 0, 1) * outside
    keep = outside - sinus
    rim = acc["rim"] * keep
    bone = np.minimum(acc["bone"], 1) * keep
    scalp = np.minimum(acc["scalp"], 1) * keep
    air = np.clip(1 - brain - rim - bone - scalp, 0, 1)
    # inside the closed hull: the brain with its fissures and cisterns, what a QSM pipeline's
    # (hole-filled) mask keeps
    hull = np.maximum(np.clip(acc["hull"], 0, 1), brain) * (1 - sinus)
    return dict(gm=gm, wm=wm, csf=csf + rim, brain=brain, bone=bone, scalp=scalp, air=air,
                sinus=sinus, nuclei=nuclei, iron=acc.get("iron"), hull=hull)


# ----------------------------------------------------------------------------------------------
# veins
def _walk(rng, tpl, start, direction, n_steps, step, score_fn, jitter=0.35):
    pts = [np.asarray(start, float)]
    d = np.asarray(direction, float)
    d /= np.linalg.norm(d)
    for _ in range(n_steps):
        cands = d[None] + rng.normal(0, jitter, (8, 3))
        cands /= np.linalg.norm(cands, axis=1, keepdims=True)
        nxt = pts[-1][None] + step * cands
        sc = score_fn(nxt) + 0.3 * (cands @ d)
        b = int(np.argmax(sc))
        if sc[b] < 0.2:
            break
        d = cands[b]
        pts.append(nxt[b])
    return np.array(pts)


def _tpl_value(tpl, arr, mni):
    from scipy import ndimage as ndi

    idx = tpl.to_index(mni).T
    return ndi.map_coordinates(arr, idx, order=1, mode="constant", cval=0.0)


def _vein_trees(rng, tpl, dens):
    """Vein trees in template MNI mm: list of dict(kind, points (N,3), radii (N,), chi);
    ``dens`` scales the number of pial and medullary veins."""
    trees = []
    csf = tpl.brain - tpl.gm - tpl.wm

    def sulcal_score(p):
        return _tpl_value(tpl, csf, p) + 0.5 * _tpl_value(tpl, tpl.gm, p) - \
            0.8 * _tpl_value(tpl, tpl.wm, p) - 2.0 * (_tpl_value(tpl, tpl.brain, p) < 0.3)

    centre = np.array([0.0, -18.0, 15.0])
    # pial veins along sulci, branching
    for _ in range(rng.poisson(28 * dens)):
        s = tpl.sulcal[rng.integers(len(tpl.sulcal))]
        radial = s - centre
        radial /= np.linalg.norm(radial)
        tang = np.cross(radial, rng.normal(size=3))
        pts = _walk(rng, tpl, s, tang, int(rng.integers(10, 30)), 1.5, sulcal_score)
        if len(pts) < 4:
            continue
        r0 = rng.uniform(0.5, 1.3)
        trees.append(dict(kind="pial", points=pts, radii=np.linspace(r0, r0 * 0.6, len(pts)),
                          chi=rng.uniform(0.25, 0.45)))
        if rng.random() < 0.6:
            b = int(rng.integers(1, len(pts) - 1))
            pb = _walk(rng, tpl, pts[b], np.cross(radial, pts[b + 1] - pts[b - 1]),
                       int(rng.integers(5, 15)), 1.5, sulcal_score)
            if len(pb) >= 3:
                trees.append(dict(kind="pial", points=pb,
                                  radii=np.linspace(r0 * 0.6, r0 * 0.4, len(pb)),
                                  chi=rng.uniform(0.25, 0.45)))

    def wm_score(p):
        return _tpl_value(tpl, tpl.wm, p) + 0.5 * _tpl_value(tpl, tpl.gm, p)

    # medullary veins: radial through WM from the ventricle walls towards the cortex
    for _ in range(rng.poisson(70 * dens)):
        s = tpl.periventricular[rng.integers(len(tpl.periventricular))]
        d = s - centre
        d[2] += rng.normal(0, 10)
        pts = _walk(rng, tpl, s, d, int(rng.integers(8, 22)), 1.5, wm_score, jitter=0.12)
        if len(pts) < 4:
            continue
        r0 = rng.uniform(0.3, 0.6)
        trees.append(dict(kind="medullary", points=pts, radii=np.full(len(pts), r0),
                          chi=rng.uniform(0.2, 0.45)))
    # deep veins and dural sinuses (fixed MNI course, jittered)
    deep = []
    for sgn in (1, -1):
        deep.append(("internal_cerebral", [(3 * sgn, 2, 16), (3 * sgn, -10, 17),
                                            (2 * sgn, -25, 15), (1 * sgn, -35, 10)], 1.1))
        deep.append(("thalamostriate", [(16 * sgn, -6, 19), (10 * sgn, -2, 18),
                                         (4 * sgn, 1, 16)], 0.7))
        deep.append(("basal_rosenthal", [(20 * sgn, -4, -12), (23 * sgn, -18, -6),
                                          (13 * sgn, -33, 2), (2 * sgn, -41, 8)], 1.0))
        deep.append(("transverse_sinus", [(3 * sgn, -102, 6), (30 * sgn, -98, -2),
                                           (50 * sgn, -80, -14), (56 * sgn, -58, -28),
                                           (46 * sgn, -42, -40)], 3.0))
    deep.append(("great_cerebral", [(0, -35, 10), (0, -42, 8), (0, -48, 6)], 2.0))
    deep.append(("straight_sinus", [(0, -48, 6), (0, -66, 6), (0, -84, 5), (0, -100, 6)], 2.5))
    top = sorted(tpl.hull_top.items())
    sss = [(0.0, y, z + 1.0) for y, z in top if -100 <= y <= 62]
    if len(sss) > 3:
        deep.append(("superior_sagittal_sinus", sss[::2], 3.5))
    for name, p, r in deep:
        p = np.asarray(p, float) + rng.normal(0, 1.0, 3)
        # densify to 1.5 mm steps
        seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
        t = np.concatenate([[0], np.cumsum(seg)])
        tt = np.linspace(0, t[-1], max(3, int(t[-1] / 1.5)))
        pts = np.stack([np.interp(tt, t, p[:, a]) for a in range(3)], 1)
        trees.append(dict(kind=name, points=pts, radii=np.full(len(pts), r * rng.uniform(0.8, 1.2)),
                          chi=rng.uniform(0.25, 0.45)))
    return trees


def _raster_segments(grid: _Grid, segments, out_frac, out_id=None, out_c2=None, b0=None):
    """Add tube segments (p0, p1, r, id) as partial-volume fractions on ``grid``.

    Area-preserving Gaussian cross-section: integral over the cross-section = pi r^2, so the
    far field (set by chi * area) is right even for veins thinner than a voxel.
    """
    s_mean = float(np.cbrt(np.prod(grid.spacing)))
    for p0, p1, r, vid in segments:
        sig2 = (r * r + s_mean * s_mean / 6.0) / 2.0
        amp = min(1.0, r * r / (2 * sig2))
        reach = math.sqrt(2 * sig2) * 2.2
        i0 = grid.to_ijk(np.stack([p0, p1]))
        pad = reach / grid.spacing
        lo = np.floor(i0.min(0) - pad).astype(int)
        hi = np.ceil(i0.max(0) + pad).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, grid.shape)
        if np.any(hi <= lo):
            continue
        ax = [np.arange(lo[a], hi[a]) for a in range(3)]
        m = grid.direction * grid.spacing
        rel = (grid.origin - p0)
        px = (ax[0][:, None, None] * m[0, 0] + ax[1][None, :, None] * m[0, 1]
              + ax[2][None, None, :] * m[0, 2] + rel[0])
        py = (ax[0][:, None, None] * m[1, 0] + ax[1][None, :, None] * m[1, 1]
              + ax[2][None, None, :] * m[1, 2] + rel[1])
        pz = (ax[0][:, None, None] * m[2, 0] + ax[1][None, :, None] * m[2, 1]
              + ax[2][None, None, :] * m[2, 2] + rel[2])
        d = np.asarray(p1) - np.asarray(p0)
        L2 = float(d @ d) or 1e-9
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / L2, 0, 1)
        dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
        f = (amp * np.exp(-dist2 / (2 * sig2))).astype(np.float32)
        sl = tuple(slice(lo[a], hi[a]) for a in range(3))
        cur = out_frac[sl]
        if out_id is not None:
            oid = out_id[sl]
            oid[(f > 0.3) & (f > cur)] = vid
        if out_c2 is not None:
            c2 = float((d @ b0) ** 2 / L2)  # cos^2 of the angle between vein and B0
            out_c2[sl][f > cur] = c2
        np.maximum(cur, f, out=cur)


# ----------------------------------------------------------------------------------------------
def _dipole_field(chi, grid: _Grid, b0_ras, pad_vox=16):
    """dB/B0 (ppm) of ``chi`` (ppm) on ``grid`` by zero-padded k-space dipole convolution."""
    import scipy.fft as sfft

    shape = [sfft.next_fast_len(n + 2 * pad_vox, real=True) for n in chi.shape]
    b = grid.direction.T @ (np.asarray(b0_ras, float) / np.linalg.norm(b0_ras))
    k = [sfft.fftfreq(n, d=s).astype(np.float32) for n, s in zip(shape, grid.spacing)]
    k[2] = sfft.rfftfreq(shape[2], d=grid.spacing[2]).astype(np.float32)
    kx, ky, kz = k[0][:, None, None], k[1][None, :, None], k[2][None, None, :]
    k2 = kx * kx + ky * ky + kz * kz
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        dk = (1.0 / 3.0 - kb * kb / k2).astype(np.float32)
    dk[0, 0, 0] = 0.0
    spec = sfft.rfftn(chi.astype(np.float32), s=shape, workers=2)
    spec *= dk
    del dk, k2, kb
    field = sfft.irfftn(spec, s=shape, workers=2)[: chi.shape[0], : chi.shape[1], : chi.shape[2]]
    return np.ascontiguousarray(field, dtype=np.float32)


def _subvoxel_box(grid: _Grid, c, reach: float, fine_mm: float, a: float):
    """The voxel box within ``reach`` mm of ``c`` (grid ijk), sub-sampled finely enough for a
    source of radius ``a`` (at most 4 M points): ``(lo, hi, n, shape, p)`` with ``p`` the RAS
    offsets from the centre, separable in the three axes; None when the box misses the grid."""
    half = reach / grid.spacing
    lo = np.maximum(np.floor(c - half).astype(int), 0)
    hi = np.minimum(np.ceil(c + half).astype(int) + 1, grid.shape)
    if np.any(hi <= lo):
        return None
    nvox = int(np.prod(hi - lo))
    fmm = min(max(fine_mm, 0.05), 0.5)
    fmm = min(fmm, max(a / 2.0, 0.1)) if a < 2 * fmm else fmm
    n = np.maximum(1, np.ceil(grid.spacing / fmm).astype(int))
    while nvox * np.prod(n) > 4e6 and np.any(grid.spacing / n < 0.5):
        coarser = np.maximum(1, np.ceil(grid.spacing / np.minimum(grid.spacing / n * 1.4, 0.5))
                             .astype(int))
        if np.array_equal(coarser, n):
            # the 1.4x step rounded back to the same count (voxels near or under 0.5 mm): one
            # sample fewer where allowed; this looped forever and hung a training run
            coarser = np.where((n > 1) & (grid.spacing / n < 0.5), n - 1, n)
            if np.array_equal(coarser, n):
                break
        n = coarser
    ax = []
    for d in range(3):
        sub = (np.arange(n[d]) + 0.5) / n[d] - 0.5
        ax.append((np.arange(lo[d], hi[d])[:, None] + sub[None]).ravel() - c[d])
    m = grid.direction * grid.spacing
    shp = (len(ax[0]), len(ax[1]), len(ax[2]))
    p = [(ax[0][:, None, None] * m[r, 0] + ax[1][None, :, None] * m[r, 1]
          + ax[2][None, None, :] * m[r, 2]).astype(np.float32) for r in range(3)]
    return lo, hi, n, shp, p


def _sphere_factor(grid: _Grid, centre, radius, axes_rot, chi, phase_per_ppm, b0_ras, rho_in,
                   fine_mm):
    """Complex signal factor and inside fraction of one compact source on its local box.

    Returns (slices, factor, inside_frac) or None if the box misses the grid.
    """
    a = float(radius)
    pole = abs(phase_per_ppm * chi) * 2.0 / 3.0
    reach = a * max(1.0, (pole / 0.15) ** (1.0 / 3.0))
    reach = min(max(reach, a + 2.0 * grid.spacing.max()), 40.0)
    box = _subvoxel_box(grid, grid.to_ijk(centre[None])[0], reach, fine_mm, a)
    if box is None:
        return None
    lo, hi, n, shp, p = box
    b = np.asarray(b0_ras, float) / np.linalg.norm(b0_ras)
    r2 = p[0] ** 2 + p[1] ** 2 + p[2] ** 2
    pb = p[0] * b[0] + p[1] * b[1] + p[2] * b[2]
    # ellipsoid test in the source frame (axes_rot columns = semi-axis directions * lengths)
    inv = np.linalg.inv(axes_rot)
    q = sum(((p[0] * inv[r, 0] + p[1] * inv[r, 1] + p[2] * inv[r, 2]) ** 2) for r in range(3))
    inside = q <= 1.0
    r2c = np.maximum(r2, (0.9 * a) ** 2)
    dB = (chi * a ** 3 / 3.0) * (3 * pb * pb / r2c - 1.0) / (r2c * np.sqrt(r2c))
    sig = np.exp(-1j * (phase_per_ppm * dB)).astype(np.complex64)
    sig[inside] = rho_in
    del dB, p, q, r2, pb, r2c
    nb = hi - lo
    fac = sig.reshape(nb[0], n[0], nb[1], n[1], nb[2], n[2]).mean(axis=(1, 3, 5))
    frac = inside.reshape(nb[0], n[0], nb[1], n[1], nb[2], n[2]).mean(axis=(1, 3, 5))
    sl = tuple(slice(lo[d], hi[d]) for d in range(3))
    return sl, fac.astype(np.complex64), frac.astype(np.float32), shp


def _homodyne_swi(sig, spacing, sigma_mm, power):
    """Homodyne high-pass phase and SWI (magnitude x negative-phase mask^power) of ``sig``."""
    lp = _smooth_lowres(sig, sigma_mm, spacing)
    phase = np.angle(sig * np.conj(lp)).astype(np.float32)
    del lp
    pmask = np.where(phase < 0, (np.pi + phase) / np.pi, 1.0).astype(np.float32)
    return phase, (np.abs(sig).astype(np.float32) * pmask ** power).astype(np.float32)


#: A CMB darkens the SWI visibly where it lowers the signal by at least this fraction of the
#: brain's median lesion-free SWI (the GRE label uses 40 % attenuation of the voxel's own signal).
SWI_VISIBLE_DROP = 0.4


def _swi_footprints(cmbs, slabs, cmb_lab, swi, swi_free, brain, voxel_mm3) -> np.ndarray:
    """Record each CMB's footprint on the SWI itself (``swi_visible_diameter_mm``) and return
    the label map of what the SWI shows: the GRE label plus each CMB's SWI footprint.

    The label is the GRE footprint, but SWI multiplies the magnitude by a phase mask: a CMB
    inside a band that the mask already darkens (phase wraps near air and bone, the cortical
    rim) changes the SWI by almost nothing, so a rater reading the SWI cannot see it. The SWI
    footprint is the part of the lesion's neighbourhood (its connected components touching the
    GRE label) where the SWI drops by at least ``SWI_VISIBLE_DROP`` x the brain's median
    lesion-free SWI; the diameter is that of the equal-volume sphere (0 when none). In the
    returned map the GRE label keeps its voxels and a footprint voxel claimed by two CMBs
    goes to the first.
    """
    from scipy import ndimage as ndi

    ref = float(np.median(swi_free[brain])) if np.any(brain) else float(np.median(swi_free))
    swi_lab = cmb_lab.copy()
    for c, slb in zip(cmbs, slabs):
        dark = (swi_free[slb] - swi[slb]) >= SWI_VISIBLE_DROP * ref
        own = cmb_lab[slb] == c["label"]
        n = 0
        if np.any(dark & own):
            lab, _ = ndi.label(dark)
            keep = np.unique(lab[dark & own])
            foot = np.isin(lab, keep[keep > 0])
            n = int(foot.sum())
            sub = swi_lab[slb]
            sub[foot & (sub == 0)] = c["label"]
        c["swi_visible_diameter_mm"] = round(2.0 * float(np.cbrt(3.0 * n * voxel_mm3
                                                                 / (4.0 * np.pi))), 3)
    return swi_lab


def _dark_context_sites(sig, brain, vein_frac, grid: _Grid, sigma_mm, power,
                        max_sites: int = 200000):
    """Voxel indices of tissue 0.5-3 mm from a voxel that the lesion-free SWI shows dark (below
    half the brain median), itself neither dark nor vein, at least 3 mm inside the grid."""
    from scipy import ndimage as ndi

    swi = _homodyne_swi(sig, grid.spacing, sigma_mm, power)[1]
    inside = brain > 0.5
    if not np.any(inside):
        return np.zeros((0, 3), int)
    ref = float(np.median(swi[inside]))
    dark = inside & (swi < 0.5 * ref)
    if not np.any(dark):
        return np.zeros((0, 3), int)
    dist = ndi.distance_transform_edt(~dark, sampling=grid.spacing)
    ok = inside & (swi > 0.7 * ref) & (vein_frac < 0.1) & (dist >= 0.5) & (dist <= 3.0)
    m = np.ceil(3.0 / grid.spacing).astype(int)
    edge = np.zeros_like(ok)
    edge[m[0]:-m[0], m[1]:-m[1], m[2]:-m[2]] = True
    sites = np.argwhere(ok & edge)
    return sites[:: max(1, len(sites) // max_sites)]


def _sample_count(rng, cfg):
    if cfg.n_cmbs is not None:
        if isinstance(cfg.n_cmbs, (tuple, list)):
            return int(rng.integers(cfg.n_cmbs[0], cfg.n_cmbs[1] + 1))
        return int(cfg.n_cmbs)
    if rng.random() < 0.25:
        return 0
    return int(min(20, 1 + rng.negative_binomial(0.8, 0.22)))


def _random_ellipsoid(rng, radius, max_ratio=1.3):
    ratio = rng.uniform(1.0, max_ratio)
    ax = np.array([ratio, 1.0, 1.0])
    ax = ax / np.cbrt(np.prod(ax)) * radius
    rot = _rotation(rng, 180.0)
    return rot * ax  # columns: semi-axis vectors


# ----------------------------------------------------------------------------------------------
# the pipeline: stages that share one state
#
# Each stage draws from ``state.rng`` in the order the single-function simulator did, so a seed
# gives the same subject as before the split; a stage that draws more (or less) changes every
# later stage's random numbers, which is why the order of PIPELINE is fixed.
@dataclass
class SimState:
    """What the stages have built so far (one object, so a variant adds a field here instead of
    threading a value through every call). Arrays named ``*_t`` lie on the target grid ``T``,
    the others on the field grid ``F`` until the signal stage drops them."""

    seed: int
    rng: np.random.Generator
    tpl: object  # anatomy.Template
    timings: dict = field(default_factory=dict)
    #: configuration values that ``truth['params']`` reports, recorded by the owning stage
    params: dict = field(default_factory=dict)
    # protocol
    te: float = 0.0  # ms
    b0: float = 0.0  # T
    spacing: np.ndarray | None = None  # target voxel size (mm)
    snr: float = 0.0
    phase_per_ppm: float = 0.0  # rad per ppm at this TE and B0
    b0_dir: np.ndarray | None = None  # unit vector, RAS
    # geometry
    warp: object = None  # anatomy.SubjectWarp
    T: _Grid | None = None  # target grid
    F: _Grid | None = None  # field grid (coarser, with margin)
    shape: np.ndarray | None = None  # T's shape as an array (arithmetic with spacings)
    same: bool = True  # F has T's spacing, so F -> T is a crop
    marg: np.ndarray | None = None  # F margin (voxels)
    cmb_lab: np.ndarray | None = None  # uint16 on T
    mim_lab: np.ndarray | None = None  # uint16 on T
    # iron
    iron_values: list | None = None  # chi of each nucleus in anatomy.NUCLEI order
    iron_chi: np.ndarray | None = None  # chi by nucleus label
    nuc_info: dict = field(default_factory=dict)  # label -> (name, centre MNI)
    # anatomy, tissue
    an: dict | None = None  # tissue fractions on F (see _sample_anatomy)
    chi_bone: float = 0.0
    m0: dict | None = None
    r2s: dict | None = None
    chi_w: np.ndarray | None = None  # tissue + iron (+ vein) chi relative to water, on F
    m0_map: np.ndarray | None = None
    r2_map: np.ndarray | None = None
    # veins (and the mimic list every mimic stage appends to)
    mimics: list = field(default_factory=list)
    next_id: int = 1
    vein_frac: np.ndarray | None = None
    vein_id: np.ndarray | None = None
    vein_chi_map: np.ndarray | None = None
    vein_c2: np.ndarray | None = None  # cos^2 of the vein's angle to B0
    # air, field
    air: bool = False  # air/bone background present (shim, dropout label)
    chi_bg: np.ndarray | None = None  # blurred air/bone chi relative to water
    field_ppm: np.ndarray | None = None
    grads: list | None = None
    # signal (target grid)
    fine_mm: float = 0.25
    m0_t: np.ndarray | None = None
    vf_t: np.ndarray | None = None
    vid_t: np.ndarray | None = None
    brain_t: np.ndarray | None = None
    hull_t: np.ndarray | None = None  # inside the closed brain hull (fissures, cisterns): QSM
    chi_t: np.ndarray | None = None  # chi relative to water inside the hull (QSM truth)
    nuc_t: np.ndarray | None = None
    sig: np.ndarray | None = None  # complex64 signal
    # compact sources
    cmbs: list = field(default_factory=list)
    cmb_slabs: list = field(default_factory=list)
    sig_free: np.ndarray | None = None  # the signal without the CMBs (SWI footprints)
    # acquisition, images
    noisy: bool = False
    gre: np.ndarray | None = None
    phase: np.ndarray | None = None
    swi: np.ndarray | None = None
    swi_lab: np.ndarray | None = None
    qsm: np.ndarray | None = None
    subject: SimulatedSubject | None = None


def stage_protocol(st: SimState, c) -> None:
    """Echo time, field strength, voxel size and SNR (drawn first: a seed's identity)."""
    rng = st.rng
    st.te = float(c.te_ms if c.te_ms is not None else rng.uniform(15, 40))
    st.b0 = float(c.b0_t if c.b0_t is not None else rng.choice([1.5, 3.0]))
    if c.spacing_mm is not None:
        spacing = np.broadcast_to(np.asarray(c.spacing_mm, float), (3,)).copy()
    else:
        ip = rng.uniform(0.45, 1.0)
        sl = rng.uniform(0.6, 3.0)
        while ip * ip * sl < c.min_voxel_mm3:
            sl = rng.uniform(0.6, 3.0)
        spacing = np.array([ip, ip, sl])
    st.spacing = spacing
    st.snr = float(c.snr if c.snr is not None else rng.uniform(25, 60))
    st.phase_per_ppm = 2 * np.pi * GAMMA_HZ_PER_T * st.b0 * st.te * 1e-3 * 1e-6  # rad per ppm
    st.b0_dir = np.asarray(c.b0_dir, float) / np.linalg.norm(c.b0_dir)


def stage_geometry(st: SimState, c) -> None:
    """The subject's warp of the template, the (oblique, maybe flipped) target grid T over the
    region of interest, and the coarser field grid F with a margin for the dipole field."""
    from .anatomy import SubjectWarp

    rng, tpl, spacing = st.rng, st.tpl, st.spacing
    rng_w = np.random.default_rng(rng.integers(2 ** 32))
    st.warp = warp = SubjectWarp(rng_w if c.deform else None, deform_mm=c.deform_mm)
    rot = _rotation(rng, c.oblique_deg)
    direction = rot.copy()
    flips = np.ones(3)
    if c.flip_axes:
        flips[:2] = np.where(rng.random(2) < 0.5, -1.0, 1.0)
    direction = direction * flips
    if c.roi_mm is None:
        bidx = np.argwhere(tpl.brain[::4, ::4, ::4] > 0.5) * 4
        loc = warp.to_subject(tpl.to_mni(bidx)) @ direction
        lo_l, hi_l = loc.min(0) - 6, loc.max(0) + 6
    else:
        size = np.broadcast_to(np.asarray(c.roi_mm, float), (3,))
        if c.roi_center_mni is not None:
            cm = np.asarray(c.roi_center_mni, float)
        else:
            cands = tpl.candidates["lobar"]
            cm = cands[rng.integers(len(cands))]
        cs = warp.to_subject(cm[None])[0] @ direction
        lo_l, hi_l = cs - size / 2, cs + size / 2
    st.shape = shape = np.maximum(4, np.round((hi_l - lo_l) / spacing)).astype(int)
    st.T = _Grid(shape, spacing, direction, direction @ (lo_l + spacing / 2))
    sF = np.maximum(spacing, c.field_min_mm)
    st.same = same = bool(np.allclose(sF, spacing))
    st.marg = marg = np.ceil(c.margin_mm / sF).astype(int)
    nF = np.ceil(shape * spacing / sF).astype(int) + 2 * marg
    oF_local = lo_l + sF / 2 - marg * sF if not same else lo_l + spacing / 2 - marg * spacing
    st.F = _Grid(nF, sF, direction, direction @ oF_local)
    st.cmb_lab = np.zeros(tuple(shape), np.uint16)
    st.mim_lab = np.zeros(tuple(shape), np.uint16)
    st.params["roi_mm"] = c.roi_mm


def stage_iron(st: SimState, c) -> None:
    """Iron susceptibility of each deep nucleus (drawn before the anatomy, which rasterises it
    with the tissue fractions); an empty ``nuc_info`` leaves the nuclei unlabelled."""
    from .anatomy import NUCLEI

    st.iron_chi = np.zeros(256, np.float32)
    if not c.iron:
        return
    st.iron_values = []
    for name, (lab, cen, ax, rngc, _) in NUCLEI.items():
        v = st.rng.uniform(*rngc)
        st.iron_values.append(v)
        for lbl, sgn in ((lab, 1), (lab + 1, -1)):
            st.iron_chi[lbl] = v
            st.nuc_info[lbl] = (name, (sgn * cen[0], cen[1], cen[2]))


def stage_anatomy(st: SimState, c) -> None:
    """Tissue fractions (GM, WM, CSF, bone, scalp, air, sinuses, nuclei, iron) on F, from the
    MNI152 template or another brain (``anatomies``; it lies on the same MNI grid, so the
    geometry drawn before stays valid). "mni152" draws nothing: its stream is unchanged."""
    name = c.anatomy
    if name == "random":
        from .anatomies import available_anatomies

        choices = ["mni152"] + available_anatomies()
        name = choices[int(st.rng.integers(len(choices)))]
    if name != "mni152":
        from .anatomies import load_anatomy

        st.tpl = load_anatomy(name)
    st.params["anatomy"] = name
    st.an = _sample_anatomy(st.F, st.warp, st.tpl, st.iron_values)


def stage_tissue(st: SimState, c) -> None:
    """Per-subject tissue chi, R2* and M0 (jittered around literature values) and their maps."""
    rng, an, b0 = st.rng, st.an, st.b0
    jit = lambda v, r=0.08: v * rng.uniform(1 - r, 1 + r)  # noqa: E731
    chi_gm, chi_wm, st.chi_bone = jit(0.02, 0.3), jit(-0.03, 0.3), jit(-2.0, 0.2)
    r2s_scale = 0.55 + 0.15 * b0
    st.r2s = r2s = dict(gm=jit(17.0) * r2s_scale, wm=jit(21.0) * r2s_scale, csf=4.0, bone=250.0,
                        scalp=jit(35.0) * r2s_scale)
    st.m0 = m0 = dict(gm=jit(0.80, 0.04), wm=jit(0.70, 0.04), csf=jit(0.95, 0.05), bone=0.05,
                      scalp=jit(0.9, 0.1))
    iron = an["iron"] if an["iron"] is not None else np.zeros(st.F.shape, np.float32)
    iron *= np.clip(an["gm"] + an["wm"], 0, 1)
    dr = 137.0 * b0 / 3.0  # Hz/ppm, R2' of iron
    st.chi_w = an["gm"] * chi_gm + an["wm"] * chi_wm + iron  # vs water
    st.m0_map = (an["gm"] * m0["gm"] + an["wm"] * m0["wm"] + an["csf"] * m0["csf"]
                 + an["bone"] * m0["bone"] + an["scalp"] * m0["scalp"]).astype(np.float32)
    st.r2_map = ((an["gm"] * r2s["gm"] + an["wm"] * r2s["wm"] + an["csf"] * r2s["csf"]
                  + an["bone"] * r2s["bone"] + an["scalp"] * r2s["scalp"])
                 / np.maximum(1 - an["air"], 1e-3) + dr * iron).astype(np.float32)


def _vein_mimic(vid, tr, pts) -> dict:
    mid = pts[len(pts) // 2]
    return dict(id=vid, type="vein", subtype=tr["kind"], centre_ras=[float(v) for v in mid],
                radius_mm=float(np.mean(tr["radii"])), chi_ppm=float(tr["chi"]),
                length_mm=float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1))),
                points_ras=[[round(float(v), 2) for v in p] for p in pts])


def stage_veins(st: SimState, c) -> None:
    """Vein trees (pial, medullary, deep, sinuses, slice-crossing) rasterised on F; their chi is
    added to ``chi_w`` and each vein becomes a mimic."""
    F = st.F
    st.vein_frac = vein_frac = np.zeros(F.shape, np.float32)
    st.vein_id = vein_id = np.zeros(F.shape, np.uint16)
    st.vein_chi_map = vein_chi_map = np.zeros(F.shape, np.float32)
    st.vein_c2 = np.zeros(F.shape, np.float32)
    if not c.veins:
        return
    rng, warp = st.rng, st.warp
    trees = _vein_trees(rng, st.tpl, c.vein_density)
    # short slice-crossing segments: dots on a single slice, tubular in 3D
    for _ in range(rng.poisson(10 * c.vein_density)):
        cands = st.tpl.candidates["lobar"]
        pr = warp.to_subject(cands[rng.integers(len(cands))][None])[0]
        nrm = st.T.direction[:, 2] + rng.normal(0, 0.25, 3)
        nrm /= np.linalg.norm(nrm)
        L = rng.uniform(3.0, 8.0)
        trees.append(dict(kind="slice_crossing",
                          points=np.stack([pr - nrm * L / 2, pr, pr + nrm * L / 2]),
                          radii=np.full(3, rng.uniform(0.35, 0.7)),
                          chi=rng.uniform(0.25, 0.45), subject_space=True))
    for tr in trees:
        pts = tr["points"] if tr.get("subject_space") else warp.to_subject(tr["points"])
        ijk = F.to_ijk(pts)
        if not np.any(np.all((ijk > -2) & (ijk < np.array(F.shape) + 1), axis=1)):
            continue
        vid = st.next_id
        st.next_id += 1
        segs = [(pts[q], pts[q + 1], float(tr["radii"][q]), vid) for q in range(len(pts) - 1)]
        _raster_segments(F, segs, vein_frac, vein_id, st.vein_c2, st.b0_dir)
        mask = vein_id == vid
        if np.any(mask):
            vein_chi_map[mask] = tr["chi"]
        st.mimics.append(_vein_mimic(vid, tr, pts))
    # chi of vein voxels without an id (fraction < 0.3): nearest tree's chi, default 0.35
    vc = np.where(vein_chi_map > 0, vein_chi_map, 0.35).astype(np.float32)
    st.chi_w = st.chi_w + vein_frac * vc


def stage_air(st: SimState, c) -> None:
    """Air and bone as susceptibility sources: the background that makes dropout near the
    sinuses and that the scanner's shim fights."""
    from scipy import ndimage as ndi

    st.air = bool(c.air)
    if not c.air:
        return
    an = st.an
    # anti-aliased air/bone boundary: a sharp 9.4 ppm step on the grid makes the discrete
    # dipole kernel ring (~0.01-0.05 ppm ripples deep in the brain, i.e. phase stripes)
    bg = (1 - an["air"]) * np.float32(CHI_TISSUE_VS_AIR) + an["bone"] * np.float32(st.chi_bone)
    st.chi_bg = ndi.gaussian_filter(bg, 0.8)  # 0.8 voxel along every axis


def stage_field(st: SimState, c) -> None:
    """Field of all extended sources on F (k-space dipole), shimmed linearly over the brain
    when air/bone are present, and its gradient (intravoxel dephasing)."""
    chi = st.chi_w if st.chi_bg is None else st.chi_bg + st.chi_w
    st.chi_bg = None
    field_ppm = _dipole_field(chi, st.F, st.b0_dir)
    del chi
    brainF = st.an["brain"] > 0.5
    if st.air and np.any(brainF):
        # linear shim over the brain (as the scanner does)
        ii = np.argwhere(brainF[::3, ::3, ::3]) * 3
        A = np.c_[np.ones(len(ii)), ii]
        coef = np.linalg.lstsq(A, field_ppm[ii[:, 0], ii[:, 1], ii[:, 2]], rcond=None)[0]
        gi = [np.arange(n, dtype=np.float32) for n in st.F.shape]
        field_ppm -= (coef[0] + coef[1] * gi[0][:, None, None] + coef[2] * gi[1][None, :, None]
                      + coef[3] * gi[2][None, None, :]).astype(np.float32)
    st.field_ppm = field_ppm
    st.grads = np.gradient(field_ppm)  # ppm per F voxel along i, j, k


def _to_target(st: SimState, arr, order=1):
    """``arr`` (on F) on the target grid T: a crop when both share the spacing, else separable
    linear (order 1) or nearest (order 0) resampling."""
    if st.same:
        sl = tuple(slice(st.marg[a], st.marg[a] + st.shape[a]) for a in range(3))
        return np.ascontiguousarray(arr[sl])
    sF = st.F.spacing
    scale = st.spacing / sF
    offs = (st.T.origin - st.F.origin) @ st.T.direction / sF
    return np.ascontiguousarray(_resample_axes(arr, scale, offs, tuple(st.shape), order))


def stage_signal(st: SimState, c) -> None:
    """Complex GRE signal on T: M0, R2* decay, sinc dephasing across each voxel from the field
    gradient, the field's phase, and the veins' blood compartment by volume fraction. Records
    ``fine_mm``, the sub-voxel spacing at which the CMB and calcification stages multiply their
    sources into this signal. The field grid's arrays are dropped here. ``gre_weighting`` other
    than "t2star" scales each tissue's M0 by its TR/flip steady state (appearance.py)."""
    rng, te, ppm = st.rng, st.te, st.phase_per_ppm
    st.fine_mm = c.fine_mm
    st.params["fine_mm"] = c.fine_mm
    if c.gre_weighting != "t2star":
        from . import appearance as ap

        proto = ap.draw_gre_weighting(c.gre_weighting, st.b0,
                                      ap.family_rng(st.seed, "gre_weighting"))
        st.params.setdefault("appearance", {})["gre_weighting"] = proto
        st.m0_map = ap.weighted_m0(st.m0_map, st.an, st.m0, proto)
    m0_t = st.m0_t = _to_target(st, st.m0_map)
    r2_t = _to_target(st, st.r2_map)
    fld_t = _to_target(st, st.field_ppm)
    vf_t = st.vf_t = np.clip(_to_target(st, st.vein_frac), 0, 1)
    c2_t = _to_target(st, st.vein_c2)
    vchi_t = _to_target(st, np.where(st.vein_chi_map > 0, st.vein_chi_map, 0.35)
                        .astype(np.float32))
    st.vid_t = _to_target(st, st.vein_id, order=0)
    brain_t = st.brain_t = _to_target(st, st.an["brain"])
    st.hull_t = _to_target(st, st.an["hull"])
    st.chi_t = _to_target(st, st.chi_w) * (st.hull_t > 0.5)
    st.nuc_t = _to_target(st, st.an["nuclei"], order=0)
    deph = np.ones(tuple(st.shape), np.float32)
    for a in range(3):
        g = _to_target(st, st.grads[a]) / st.F.spacing[a] * st.spacing[a]  # ppm per T voxel
        y = np.abs(g * np.float32(ppm / 2.0)) + np.float32(1e-6)
        deph *= np.sin(y) / y
    for name in ("grads", "field_ppm", "m0_map", "r2_map", "chi_w", "vein_frac", "vein_id",
                 "vein_chi_map", "vein_c2", "an"):
        setattr(st, name, None)
    r2_blood = (25.0 if st.b0 < 2 else 70.0) * rng.uniform(0.8, 1.2)
    rel_blood = np.exp(-te * 1e-3 * np.maximum(r2_blood - r2_t, 0)).astype(np.float32)
    # intravascular field of a long cylinder relative to its surroundings:
    # chi/6 (3 cos^2 theta - 1); the blood compartment adds with its own phase (complex partial
    # volume), which is what makes sub-voxel veins dark on GRE/SWI
    vphase = (np.float32(ppm / 6.0) * vchi_t * (3 * c2_t - 1)).astype(np.float32)
    comp = (1 - vf_t) + vf_t * rel_blood * 0.9 * np.exp(-1j * vphase)
    mag = m0_t * np.exp(-te * 1e-3 * r2_t) * deph
    st.sig = (mag * comp * np.exp(-1j * ppm * fld_t)).astype(np.complex64)


def _inside_fov(st: SimState, p, margin=2.0) -> bool:
    ijk = st.T.to_ijk(np.asarray(p)[None])[0]
    return np.all(ijk >= margin / st.spacing) and np.all(ijk <= st.shape - 1 - margin / st.spacing)


def _footprint(st: SimState, centre_ras, radius, chi, rho, rot_axes, lobes=None):
    """A compact source's signal factor, inside fraction and labelled footprint on T, and how
    many footprint voxels are really attenuated (the centre voxel is labelled anyway).
    ``lobes``: a lobulated source (lesions.compound_factor) instead of the ellipsoid."""
    from scipy import ndimage as ndi

    if lobes is not None:
        from .lesions import compound_factor

        res = compound_factor(st.T, np.asarray(centre_ras, float), radius, lobes, chi,
                              st.phase_per_ppm, st.b0_dir, rho, st.fine_mm)
    else:
        res = _sphere_factor(st.T, np.asarray(centre_ras, float), radius, rot_axes, chi,
                             st.phase_per_ppm, st.b0_dir, rho, st.fine_mm)
    if res is None:
        return None
    slb, fac, frac, _ = res
    foot = (np.abs(fac) < 0.6) | (frac >= 0.5)
    ci = np.round(st.T.to_ijk(np.asarray(centre_ras)[None])[0]).astype(int)
    ci = np.clip(ci, 0, np.array(st.shape) - 1)
    loc = ci - np.array([s.start for s in slb])
    forced = 0
    if np.all(loc >= 0) and np.all(loc < np.array(foot.shape)):
        forced = int(not foot[tuple(loc)])
        foot[tuple(loc)] = True
        lab, _ = ndi.label(foot)
        foot = lab == lab[tuple(loc)]
    return slb, fac, frac, foot, int(foot.sum()) - forced


def _visible_diameter(st: SimState, fp) -> float:
    """Equivalent-sphere diameter (mm) of the attenuated part of a footprint."""
    return 2.0 * float(np.cbrt(3.0 * fp[4] * float(np.prod(st.spacing)) / (4.0 * np.pi)))


def _draw_cmb_source(rng, c):
    """Susceptibility and true radius of a random CMB (total chi*V is log-normal)."""
    chi = float(c.cmb_chi_ppm if c.cmb_chi_ppm is not None else rng.uniform(0.3, 1.0))
    if c.cmb_radius_mm is not None:
        return chi, float(c.cmb_radius_mm)
    mom = float(np.exp(rng.normal(np.log(2.2), 0.9)))
    return chi, float(np.clip(np.cbrt(mom / chi / (4 / 3 * np.pi)), 0.4, 4.0))


def _cmb_site_pool(st: SimState) -> dict:
    """Candidate CMB centres per category (template and subject mm), 3 mm inside T."""
    spacing, pool = st.spacing, {}
    for cat, cands in st.tpl.candidates.items():
        sub_c = cands[:: max(1, len(cands) // 20000)]
        pr_all = st.warp.to_subject(sub_c)
        ijk = st.T.to_ijk(pr_all)
        ok = np.all((ijk >= 3.0 / spacing) & (ijk <= st.shape - 1 - 3.0 / spacing), axis=1)
        if np.any(ok):
            pool[cat] = (sub_c[ok], pr_all[ok])
    return pool


def _random_cmb_specs(st: SimState, c) -> list:
    """Random CMBs: category by prior (lobar/deep/infratentorial), >= 8 mm apart, a share
    ``cmb_dark_context`` of them next to what the lesion-free SWI shows dark."""
    rng, warp, T = st.rng, st.warp, st.T
    n_c = _sample_count(rng, c)
    pool = _cmb_site_pool(st) if n_c else {}
    prior = {"lobar": 0.55, "deep": 0.3, "infratentorial": 0.15}
    cats = sorted(pool)
    pw = np.array([prior[k] for k in cats])
    dark_sites = None
    if n_c and c.cmb_dark_context > 0:
        dark_sites = _dark_context_sites(st.sig, st.brain_t, st.vf_t, T, c.homodyne_sigma_mm,
                                         c.swi_power)
    specs, tries = [], 0
    while cats and len(specs) < n_c and tries < 400:
        tries += 1
        if (dark_sites is not None and len(dark_sites)
                and rng.random() < c.cmb_dark_context):
            q = int(rng.integers(len(dark_sites)))
            pr = T.to_ras((dark_sites[q] + rng.uniform(-0.5, 0.5, 3))[None])[0]
            pm = warp.to_template(pr[None])[0]
        else:
            cat = cats[int(rng.choice(len(cats), p=pw / pw.sum()))]
            mni_c, ras_c = pool[cat]
            q = int(rng.integers(len(mni_c)))
            jit_mm = rng.uniform(-1, 1, 3)
            pm = mni_c[q] + jit_mm
            pr = warp.to_subject(pm[None])[0]
        if any(np.linalg.norm(pr - s["centre_ras"]) < 8 for s in specs):
            continue
        # total susceptibility chi*V (ppm mm^3) is the randomised quantity
        chi, rad = _draw_cmb_source(rng, c)
        specs.append(dict(centre_ras=pr, radius=rad, chi=chi, mni=pm,
                          axes=_random_ellipsoid(rng, rad), random=True))
    return specs


def _add_cmb(st: SimState, s: dict, fp) -> None:
    """Multiply one CMB into the signal and chi, label its footprint, record its truth."""
    from .anatomy import category_of

    slb, fac, frac, foot, _ = fp
    st.sig[slb] *= fac
    st.chi_t[slb] += s["chi"] * frac
    st.cmb_slabs.append(slb)
    cid = len(st.cmbs) + 1
    sub = st.cmb_lab[slb]
    sub[foot & (sub == 0)] = cid
    cat, reg = category_of(s["mni"])
    st.cmbs.append(dict(id=cid, label=cid, centre_ras=[float(v) for v in s["centre_ras"]],
                        centre_mni=[round(float(v), 2) for v in s["mni"]],
                        radius_mm=round(float(s["radius"]), 4), chi_ppm=round(s["chi"], 4),
                        total_chi_ppm_mm3=round(s["chi"] * 4 / 3 * np.pi * s["radius"] ** 3, 4),
                        axes_mm=[round(float(v), 3) for v in np.linalg.norm(s["axes"], axis=0)],
                        category=cat, region=reg, n_label_voxels=int(foot.sum()),
                        visible_diameter_mm=round(_visible_diameter(st, fp), 3)))
    from .lesions import truth_fields

    st.cmbs[-1].update(truth_fields(st, s, fp, st.cmbs[-1]["visible_diameter_mm"]))


def stage_cmbs(st: SimState, c) -> None:
    """CMBs (explicit or random) multiplied into the signal on a fine sub-grid, so blooming
    comes from intravoxel dephasing; each labelled by its visible GRE footprint. Keeps the
    lesion-free signal (``sig_free``) for the SWI footprints."""
    from . import lesions

    if c.cmb_specs:
        specs = []
        for s in c.cmb_specs:
            cr = np.asarray(s["centre_ras"], float)
            specs.append(dict(centre_ras=cr, radius=float(s.get("radius_mm", 1.0)),
                              chi=float(s.get("chi_ppm", 0.6)),
                              mni=st.warp.to_template(cr[None])[0],
                              axes=np.eye(3) * float(s.get("radius_mm", 1.0))))
    else:
        specs = _random_cmb_specs(st, c)
        if lesions.active(c):  # size prior, shape, touching, clusters (own random stream)
            specs = lesions.prepare_cmbs(st, c, specs)
    min_d = float(c.min_visible_diameter_mm)
    st.params["min_visible_diameter_mm"] = c.min_visible_diameter_mm
    # the same signal without the CMBs, to measure what each CMB changes on SWI
    st.sig_free = st.sig.copy() if specs else None
    for s in specs:
        if "unit_lobes" in s:  # prepared by lesions.prepare_cmbs: radius fitted to its target
            fp = lesions.cmb_footprint(st, s, [q["centre_ras"] for q in specs if q is not s])
            if fp is not None and _visible_diameter(st, fp) >= min_d:
                _add_cmb(st, s, fp)
            continue
        fp = _footprint(st, s["centre_ras"], s["radius"], s["chi"], 0.03 + 0j, s["axes"])
        if fp is None:
            continue
        if min_d > 0 and s.get("random") and c.cmb_radius_mm is None:
            # a rater marks what the scan shows: redraw a source too faint for this TE, field
            # and voxel size to leave a visible footprint of min_d (drop it after 50 draws)
            tries = 0
            while _visible_diameter(st, fp) < min_d and tries < 50:
                tries += 1
                s["chi"], s["radius"] = _draw_cmb_source(st.rng, c)
                s["axes"] = _random_ellipsoid(st.rng, s["radius"])
                fp = _footprint(st, s["centre_ras"], s["radius"], s["chi"], 0.03 + 0j,
                                s["axes"])
            if _visible_diameter(st, fp) < min_d:
                continue
        _add_cmb(st, s, fp)


def _calcification_sites(st: SimState) -> list:
    """Random calcifications at their usual sites (pineal, choroid plexus, basal ganglia)."""
    rng, sites, calcs = st.rng, [], []
    if rng.random() < 0.6:
        sites.append(("pineal", (0.0, -32.0, 2.0), rng.uniform(1.0, 2.5)))
    if rng.random() < 0.5:
        for sgn in (1, -1):
            sites.append(("choroid_plexus", (27.0 * sgn, -42.0, 12.0), rng.uniform(1.0, 2.5)))
    if rng.random() < 0.2:
        sg = rng.choice([1, -1])
        sites.append(("basal_ganglia", (19.0 * sg, -3.0, -1.0), rng.uniform(0.6, 1.5)))
    for site, cm, rad in sites:
        pm = np.asarray(cm) + rng.normal(0, 1.5, 3)
        calcs.append((st.warp.to_subject(pm[None])[0], rad, rng.uniform(-3.0, -1.0), site))
    return calcs


def stage_calcifications(st: SimState, c) -> None:
    """Diamagnetic calcifications (explicit or random), multiplied into both signals like the
    CMBs and labelled as mimics."""
    if c.calc_specs:
        calcs = [(np.asarray(s["centre_ras"], float), float(s.get("radius_mm", 1.5)),
                  float(s.get("chi_ppm", -2.0)), s.get("site", "explicit")) for s in c.calc_specs]
    elif c.calcifications:
        calcs = _calcification_sites(st)
    else:
        calcs = []
    from . import lesions

    lesions._check(c.calc_size_prior)
    sized = c.calc_size_prior != "legacy" and not c.calc_specs
    lrng = lesions.lesion_rng(st.seed, 1) if sized else None
    for cr, rad, chi, site in calcs:
        if not _inside_fov(st, cr, 0.0):
            continue
        axes = _random_ellipsoid(st.rng, rad, 1.2)
        if sized:  # visible diameter from the CMBs' prior: mimics over the same size range
            fp, rad, target = lesions.fit_calcification(st, lrng, cr, rad, chi, axes,
                                                        c.calc_size_prior)
        else:
            fp = _footprint(st, cr, rad, chi, 0.15 + 0j, axes)
        if fp is None:
            continue
        slb, fac, frac, foot, _ = fp
        st.sig[slb] *= fac
        if st.sig_free is not None:
            st.sig_free[slb] *= fac
        st.chi_t[slb] += chi * frac
        vid = st.next_id
        st.next_id += 1
        sub = st.mim_lab[slb]
        sub[foot & (sub == 0)] = vid
        st.mimics.append(dict(id=vid, type="calcification", subtype=site,
                              centre_ras=[float(v) for v in cr], radius_mm=round(rad, 4),
                              chi_ppm=round(float(chi), 4),
                              visible_diameter_mm=round(_visible_diameter(st, fp), 3)))
        if sized:
            st.mimics[-1]["target_visible_diameter_mm"] = round(target, 3)


def stage_labels(st: SimState, c) -> None:
    """Mimic label map of veins (fraction >= 0.3), iron-laden nuclei and the air dropout
    (judged on the noise-free signal, hence before the acquisition stage)."""
    from scipy import ndimage as ndi

    from .anatomy import NUCLEUS_OF_LABEL, SINUSES

    mim_lab, vf_t = st.mim_lab, st.vf_t
    vmask = (vf_t >= 0.3) & (st.vid_t > 0) & (mim_lab == 0)
    mim_lab[vmask] = st.vid_t[vmask]
    present = set(np.unique(mim_lab[vmask]).tolist())
    st.mimics = [m for m in st.mimics if m["type"] != "vein" or m["id"] in present]
    for lbl, (name, cm) in sorted(st.nuc_info.items()):
        msk = (st.nuc_t == lbl) & (mim_lab == 0)
        if not np.any(msk):
            continue
        vid = st.next_id
        st.next_id += 1
        mim_lab[msk] = vid
        cen = st.warp.to_subject(np.asarray(cm)[None])[0]
        st.mimics.append(dict(id=vid, type="iron", subtype=name,
                              region=f"{name}_{NUCLEUS_OF_LABEL[lbl][1]}",
                              centre_ras=[float(v) for v in cen],
                              chi_ppm=round(float(st.iron_chi[lbl]), 4)))
    if not st.air:
        return
    dark = np.abs(st.sig) < 0.5 * np.abs(st.m0_t) * np.exp(-st.te * 1e-3 * 20)
    drop = dark & (st.brain_t > 0.5)
    drop &= (mim_lab == 0) & (st.cmb_lab == 0) & (vf_t < 0.1)
    drop = ndi.binary_opening(drop)
    if np.any(drop):
        vid = st.next_id
        st.next_id += 1
        mim_lab[drop] = vid
        cen = st.T.to_ras(np.argwhere(drop).mean(0)[None])[0]
        st.mimics.append(dict(id=vid, type="air_dropout", subtype="skull_base",
                              centre_ras=[float(v) for v in cen], sinuses=sorted(SINUSES)))


def _bias_field(rng, shape) -> np.ndarray:
    """Smooth log bias: a few separable low-frequency cosine products plus linear ramps."""
    logb = np.zeros(tuple(shape), np.float32)
    for _ in range(4):
        f = [np.cos(np.pi * rng.uniform(0.3, 1.2) * np.linspace(-1, 1, n) + rng.uniform(
            0, 2 * np.pi)).astype(np.float32) for n in shape]
        logb += np.float32(rng.normal(0, 0.07)) * (f[0][:, None, None] * f[1][None, :, None]
                                                    * f[2][None, None, :])
    for a in range(3):
        lin = np.linspace(-1, 1, shape[a], dtype=np.float32) * np.float32(rng.normal(0, 0.06))
        logb += lin.reshape([-1 if q == a else 1 for q in range(3)])
    return logb


def stage_acquisition(st: SimState, c) -> None:
    """Receive bias, scaling to ``scale`` in white matter and complex Gaussian noise (Rician
    magnitude), applied alike to the lesion-free signal. Appearance knobs (appearance.py):
    bias strength, brain texture, Gibbs truncation and ghosts on the noise-free signal, and a
    g-factor map scaling the noise; their random fields come from their own generators, so
    the main stream draws the same bias and noise."""
    from . import appearance as ap

    sig, free = st.sig, st.sig_free
    knobs = dict(gfactor=c.gfactor, bias_strength=c.bias_strength, gibbs=c.gibbs,
                 ghosting=c.ghosting, texture=c.texture)
    app = gmap = None
    if knobs != ap.ACQUISITION_DEFAULTS:
        app = ap.draw_acquisition(knobs, lambda k: ap.family_rng(st.seed, k))
        st.params.setdefault("appearance", {}).update({k: v for k, (v, _) in app.items()})
    if c.bias:
        logb = _bias_field(st.rng, st.shape)
        if app is not None and app["bias_strength"][0] != 1.0:
            logb *= np.float32(app["bias_strength"][0])
        sig *= np.exp(logb)
        if free is not None:
            free *= np.exp(logb)
        del logb
    wm_ref = st.m0["wm"] * math.exp(-st.te * 1e-3 * st.r2s["wm"])
    sig *= np.float32(c.scale / wm_ref)
    if free is not None:
        free *= np.float32(c.scale / wm_ref)
    if app is not None:
        gmap, effects = ap.acquisition_effects(app, st.shape, st.spacing, st.brain_t)
        st.sig = sig = effects(sig)
        if free is not None:
            st.sig_free = free = effects(free)
    st.noisy = bool(c.noise)
    if c.noise:
        sd = c.scale / st.snr
        for part in ("real", "imag"):
            nz = st.rng.standard_normal(sig.shape, dtype=np.float32) * np.float32(sd)
            if gmap is not None:
                nz *= gmap
            getattr(sig, part)[...] += nz
            if free is not None:
                getattr(free, part)[...] += nz
            del nz


def stage_gre(st: SimState, c) -> None:
    """GRE magnitude."""
    st.gre = np.abs(st.sig).astype(np.float32)


def stage_swi(st: SimState, c) -> None:
    """SWI by homodyne filtering, and the CMB label map as the SWI shows it (each CMB's SWI
    footprint, measured against the lesion-free SWI). Appearance knobs (appearance.py): a 2D
    k-space Hann homodyne instead of the Gaussian, the positive or both-sided phase mask, a
    minimum-intensity projection; the lesion-free SWI is made the same way."""
    sigma, power, spacing = c.homodyne_sigma_mm, c.swi_power, st.spacing

    def make(s):
        return _homodyne_swi(s, spacing, sigma, power)

    if (c.swi_filter, c.swi_mask, c.swi_mip, c.swi_filter_width) != ("gaussian", "negative", 0,
                                                                      None):
        from . import appearance as ap

        v = ap.draw_swi(c.swi_filter, c.swi_mask, c.swi_mip, sigma, power,
                        lambda k: ap.family_rng(st.seed, k), c.swi_filter_width)
        st.params.setdefault("appearance", {})["swi"] = v
        sigma, power = v["sigma_mm"], v["power"]

        def make(s):  # noqa: F811
            lp = (_smooth_lowres(s, sigma, spacing) if v["filter"] == "gaussian"
                  else ap.hann_lowpass(s, spacing, sigma))
            return ap.swi_image(s, lp, power, v["mask"], v["mip"])

    st.params["swi_power"], st.params["homodyne_sigma_mm"] = power, sigma
    st.phase, st.swi = make(st.sig)
    st.swi_lab = st.cmb_lab
    if st.sig_free is not None:
        st.swi_lab = _swi_footprints(st.cmbs, st.cmb_slabs, st.cmb_lab, st.swi,
                                     make(st.sig_free)[1],
                                     st.brain_t > 0.5, float(np.prod(spacing)))
        st.sig_free = None


def stage_qsm(st: SimState, c) -> None:
    """QSM: true chi blurred like a reconstruction, noisy when the acquisition was, inside the
    eroded hull (the brain with its fissures and cisterns, as a hole-filled pipeline mask). Appearance knobs (appearance.py): TKD or Tikhonov inversion of the simulated
    local field, background residue, ppm scale and offset; the main stream's noise draws are
    consumed as before."""
    from scipy import ndimage as ndi

    from . import appearance as ap

    knobs = dict(qsm_recon=c.qsm_recon, qsm_background=c.qsm_background,
                 qsm_scale=c.qsm_scale, qsm_offset_ppm=c.qsm_offset_ppm)
    if knobs != ap.QSM_DEFAULTS:
        v = ap.draw_qsm(knobs, lambda k: ap.family_rng(st.seed, k))
        st.params.setdefault("appearance", {})["qsm"] = v
        brain = (st.hull_t > 0.5).astype(np.float32)
        white = fnoise = None
        if st.noisy:
            white = st.rng.standard_normal(st.chi_t.shape, dtype=np.float32)
            # phase noise ~ 1 / (SNR x relative magnitude), in ppm of field
            mag = np.abs(st.sig)
            ref = float(np.median(mag[brain > 0])) if np.any(brain) else float(mag.max())
            fnoise = (ref / st.snr / np.maximum(mag, 0.1 * ref) / st.phase_per_ppm)
        b = st.T.direction.T @ (np.asarray(st.b0_dir, float) / np.linalg.norm(st.b0_dir))
        qsm = ap.qsm_variant(st.chi_t, brain, st.spacing, b, v,
                             ap.family_rng(st.seed, "qsm_background", 1), white, fnoise,
                             0.006 * 3.0 / st.b0 * 40.0 / st.snr, c.qsm_blur_vox)
        st.qsm = (qsm * ndi.binary_erosion(brain > 0, iterations=1)).astype(np.float32)
        return
    qsm = ndi.gaussian_filter(st.chi_t, c.qsm_blur_vox)
    if st.noisy:
        qsm += st.rng.standard_normal(qsm.shape, dtype=np.float32) * np.float32(
            0.006 * 3.0 / st.b0 * 40.0 / st.snr)
    st.qsm = (qsm * ndi.binary_erosion(st.hull_t > 0.5, iterations=1)).astype(np.float32)


def _jsonable(value):
    """Plain JSON types (numpy scalars and arrays, tuples) for truth.json."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def stage_truth(st: SimState, c) -> None:
    """Truth JSON and the :class:`SimulatedSubject` (volumes on T)."""
    rec, T = st.params, st.T
    params = dict(seed=int(st.seed), TE_ms=round(st.te, 3), B0_T=st.b0,
                  spacing=[float(v) for v in st.spacing], shape_ijk=[int(v) for v in st.shape],
                  b0_dir_ras=[float(v) for v in st.b0_dir], snr=round(st.snr, 2),
                  phase_rad_per_ppm=round(st.phase_per_ppm, 4),
                  field_grid_mm=[float(v) for v in st.F.spacing], fine_mm=rec["fine_mm"],
                  roi_mm=rec["roi_mm"], swi_power=rec["swi_power"],
                  homodyne_sigma_mm=rec["homodyne_sigma_mm"],
                  phase_convention="phase = -gamma*dB*TE; paramagnetic -> negative pole phase",
                  cmb_label="visible GRE footprint (>=40% attenuation) + centre voxel",
                  min_visible_diameter_mm=rec["min_visible_diameter_mm"],
                  simulator="CMBDetectorLib.simulation v1")
    # the drawn domain (only when it is not the default, so default subjects keep their truth)
    if rec.get("anatomy", "mni152") != "mni152":
        params["anatomy"] = rec["anatomy"]
    if rec.get("appearance"):
        params["appearance"] = _jsonable(rec["appearance"])
    truth = dict(cmbs=st.cmbs, mimics=st.mimics, params=params)
    images = {"gre": T.volume(st.gre, "gre"), "swi": T.volume(st.swi, "swi"),
              "qsm": T.volume(st.qsm, "qsm")}
    bmask = st.brain_t > 0.5
    st.subject = SimulatedSubject(images=images, cmb_labels=T.volume(st.cmb_lab, "cmb"),
                                  mimic_labels=T.volume(st.mim_lab, "mimics"),
                                  brain_mask=T.volume(bmask.astype(np.uint8), "brainmask"),
                                  truth=truth, phase=T.volume(st.phase, "phase"),
                                  timings=st.timings,
                                  swi_cmb_labels=T.volume(st.swi_lab, "cmb_swi"))


#: The stages in the order they run (the order of the random draws; see STAGE_FIELDS for
#: which configuration fields each one reads).
PIPELINE = (
    ("protocol", stage_protocol),
    ("geometry", stage_geometry),
    ("iron", stage_iron),
    ("anatomy", stage_anatomy),
    ("tissue", stage_tissue),
    ("veins", stage_veins),
    ("air", stage_air),
    ("field", stage_field),
    ("signal", stage_signal),
    ("cmbs", stage_cmbs),
    ("calcifications", stage_calcifications),
    ("labels", stage_labels),
    ("acquisition", stage_acquisition),
    ("gre", stage_gre),
    ("swi", stage_swi),
    ("qsm", stage_qsm),
    ("truth", stage_truth),
)


def run_stages(seed: int, config: SimulationConfig | None = None,
               until: str | None = None) -> SimState:
    """Run the pipeline (up to and including stage ``until``) and return its state; each stage
    gets the block of its own configuration fields only."""
    from .anatomy import load_template

    names = [n for n, _ in PIPELINE]
    if until is not None and until not in names:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(names)}")
    cfg = config or SimulationConfig()
    rng = np.random.default_rng(int(seed))
    t_start = time.perf_counter()
    st = SimState(seed=int(seed), rng=rng, tpl=load_template())
    st.timings["template"] = time.perf_counter() - t_start
    for name, stage in PIPELINE:
        t0 = time.perf_counter()
        stage(st, cfg.block(name))
        st.timings[name] = time.perf_counter() - t0
        if name == until:
            break
    st.timings["total"] = time.perf_counter() - t_start
    return st


def simulate_subject(seed: int, config: SimulationConfig | None = None) -> SimulatedSubject:
    """Simulate one subject (GRE, SWI, QSM on one target grid) with ground truth.

    A fixed ``seed`` and ``config`` give identical output.
    """
    return run_stages(seed, config).subject


def write_subject(subject: SimulatedSubject, out_dir, stem: str, modalities=MODALITIES,
                  labels: bool = True) -> dict:
    """Write ``<stem>_<modality>.nii.gz``, ``<stem>_cmb.nii.gz``, ``<stem>_mimics.nii.gz``,
    ``<stem>_brainmask.nii.gz`` and ``<stem>_truth.json``; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in modalities:
        p = out / f"{stem}_{m}.nii.gz"
        write_volume(subject.images[m], p)
        paths[m] = p
    if labels:
        for kind, vol in (("cmb", subject.cmb_labels), ("mimics", subject.mimic_labels),
                          ("brainmask", subject.brain_mask)):
            p = out / f"{stem}_{kind}.nii.gz"
            write_volume(vol, p)
            paths[kind] = p
    p = out / f"{stem}_truth.json"
    tmp = p.with_name(p.name + ".part")
    tmp.write_text(json.dumps(subject.truth, indent=1))
    tmp.replace(p)
    paths["truth"] = p
    return paths


def config_to_dict(cfg: SimulationConfig) -> dict:
    return asdict(cfg)


#: fixed recipe of the bundled demo scan (an axial slab through the basal ganglia)
DEMO_SEED = 2026  # chosen so the slab holds deep, lobar and infratentorial CMBs + a calcification
DEMO_CONFIG = dict(roi_mm=(150.0, 180.0, 42.0), roi_center_mni=(0.0, -18.0, 12.0),
                   spacing_mm=(0.8, 0.8, 1.5), te_ms=20.0, b0_t=3.0, n_cmbs=6,
                   oblique_deg=8.0, flip_axes=False, snr=45.0)


def make_demo(out_dir, seed: int = DEMO_SEED) -> dict:
    """Regenerate the demo scan ``CMBDemo_SWI.nii.gz`` (int16, a few MB) with its CMB label map,
    mimic label map and ``CMBDemo_SWI_truth.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sub = simulate_subject(seed, SimulationConfig(**DEMO_CONFIG))
    swi = sub.images["swi"]
    swi16 = Volume(np.clip(np.round(swi.array), 0, 32767).astype(np.int16), swi.ijk_to_ras,
                   "CMBDemo_SWI")
    paths = {"swi": out / "CMBDemo_SWI.nii.gz", "cmb": out / "CMBDemo_SWI_cmb.nii.gz",
             "mimics": out / "CMBDemo_SWI_mimics.nii.gz", "truth": out / "CMBDemo_SWI_truth.json"}
    write_volume(swi16, paths["swi"])
    write_volume(sub.cmb_labels, paths["cmb"])
    write_volume(sub.mimic_labels, paths["mimics"])
    truth = dict(sub.truth)
    truth["params"] = dict(truth["params"], demo=True,
                           regenerate="cmbdetector synth --demo  (or make_demo(dir))")
    paths["truth"].write_text(json.dumps(truth, indent=1))
    return paths
