"""Appearance variants of the simulated scans (issue 25): GRE weighting, SWI processing, QSM
reconstruction, acquisition artefacts, and a training-time intensity transform.

Why: the bundled models learned one simulator's look. On other scanners' processing they lose up
to 25 points of sensitivity, and clinically reconstructed QSM (TKD, Tikhonov) gives them 7-13
false positives per scan. Domain randomisation (SynthSeg, Billot et al. 2023) says: keep the
physics that defines the lesion (dipole field, dephasing, sign of chi) and randomise the rest of
the appearance harder than reality. This module holds that "rest" as pure functions on numpy
arrays; the simulator's signal, acquisition, swi and qsm stages call them (see
``SimulationConfig`` between the "appearance variants" markers, and docs/simulation.md,
"Appearance variants").

Random draws never touch the simulator's main random stream: each knob draws from its own
generator ``family_rng(seed, knob)`` seeded from the subject seed, so a seed's anatomy, lesions
and noise are the same whichever variants are on, and the defaults reproduce the simulator's
output bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

#: Every appearance knob (a ``SimulationConfig`` field), in a fixed order: the index seeds the
#: knob's own generator, so adding a knob at the end changes no other knob's draws.
KNOBS = ("gre_weighting", "gfactor", "bias_strength", "gibbs", "ghosting", "texture",
         "swi_filter", "swi_mask", "swi_mip", "qsm_recon", "qsm_background", "qsm_scale",
         "qsm_offset_ppm", "swi_filter_width")

#: ``SimulationConfig(**RANDOM_APPEARANCE)``: every appearance knob drawn per subject.
RANDOM_APPEARANCE = {k: "random" for k in KNOBS}

#: Defaults of the acquisition knobs: today's simulator (nothing drawn, nothing changed).
ACQUISITION_DEFAULTS = dict(gfactor=0.0, bias_strength=1.0, gibbs=0.0, ghosting=0.0, texture=0.0)
GRE_WEIGHTINGS = ("t2star", "2d_long_tr", "3d_spoiled", "mixed")
SWI_FILTERS = ("gaussian", "hann")
SWI_MASKS = ("negative", "positive", "both")
QSM_RECONS = ("current", "tkd", "tikhonov")


def family_rng(seed: int, knob: str, part: int = 0) -> np.random.Generator:
    """The generator of one appearance knob for one subject (independent of the main stream
    and of the other knobs); ``part`` > 0 gives further independent streams of the knob."""
    key = [int(seed), 25, KNOBS.index(knob)] + ([int(part)] if part else [])
    return np.random.default_rng(key)


def _pick(value, allowed, knob):
    if value not in allowed:
        raise ValueError(f"{knob}={value!r}; expected one of {', '.join(allowed)} or 'random'")
    return value


# ----------------------------------------------------------------------------------------------
# GRE weighting
#: Longitudinal relaxation T1 (ms) at 1.5 T and 3 T (literature means; jittered +-10 %).
T1_MS = {"gm": (1100.0, 1550.0), "wm": (650.0, 900.0), "csf": (4000.0, 4300.0),
         "scalp": (300.0, 380.0), "bone": (300.0, 300.0)}
#: (TR ms, flip deg) ranges of each weighting. 2D long-TR multi-slice GRE keeps CSF bright;
#: 3D short-TR spoiled GRE (most SWI protocols) saturates long-T1 CSF, so it turns dark at
#: TE ~20 ms; "mixed" spans PD- to T1-weighted (log-uniform TR).
GRE_PROTOCOLS = {"2d_long_tr": ((600.0, 1000.0), (15.0, 25.0)),
                 "3d_spoiled": ((25.0, 45.0), (12.0, 20.0)),
                 "mixed": ((15.0, 1000.0), (5.0, 40.0))}


def spoiled_gre_factor(t1_ms, tr_ms: float, flip_deg: float):
    """Steady-state factor of a spoiled GRE, sin(a) (1 - E1) / (1 - cos(a) E1), E1 =
    exp(-TR/T1) (the signal is M0 times this times exp(-TE R2*))."""
    a = math.radians(flip_deg)
    e1 = np.exp(-tr_ms / np.asarray(t1_ms, float))
    return math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1)


def draw_gre_weighting(value: str, b0: float, rng) -> dict:
    """Resolve ``gre_weighting`` to a protocol: variant, TR, flip and per-tissue T1."""
    if value == "random":
        value = GRE_WEIGHTINGS[int(rng.integers(len(GRE_WEIGHTINGS)))]
    _pick(value, GRE_WEIGHTINGS, "gre_weighting")
    if value == "t2star":
        return dict(variant="t2star")
    (tr_lo, tr_hi), (fa_lo, fa_hi) = GRE_PROTOCOLS[value]
    tr = float(math.exp(rng.uniform(math.log(tr_lo), math.log(tr_hi))))
    flip = float(rng.uniform(fa_lo, fa_hi))
    w = min(max((b0 - 1.5) / 1.5, 0.0), 1.0)
    t1 = {t: float((lo + w * (hi - lo)) * rng.uniform(0.9, 1.1)) for t, (lo, hi) in T1_MS.items()}
    return dict(variant=value, tr_ms=round(tr, 2), flip_deg=round(flip, 2), t1_ms=t1)


def weighted_m0(m0_map, fractions: dict, m0: dict, protocol: dict):
    """M0 map with each tissue's share scaled by its steady-state factor relative to white
    matter (so WM keeps its intensity and the acquisition's scaling is unchanged). Tissues not
    in ``T1_MS`` keep their M0."""
    if protocol["variant"] == "t2star":
        return m0_map
    tr, flip, t1 = protocol["tr_ms"], protocol["flip_deg"], protocol["t1_ms"]
    ref = float(spoiled_gre_factor(t1["wm"], tr, flip))
    out = np.array(m0_map, np.float32, copy=True)
    for t, t1v in t1.items():
        if t in fractions and t in m0 and fractions[t] is not None:
            f = float(spoiled_gre_factor(t1v, tr, flip)) / ref
            out += np.float32(m0[t] * (f - 1.0)) * fractions[t]
    return out


# ----------------------------------------------------------------------------------------------
# acquisition
def draw_acquisition(knobs: dict, rng_of) -> dict:
    """Resolve the acquisition knobs (``gfactor``, ``bias_strength``, ``gibbs``, ``ghosting``,
    ``texture``); ``rng_of(knob)`` gives each knob's generator. 'random' ranges: g-factor excess
    0-1.5 (half the subjects none), bias log-strength x0.3-3, Gibbs 5-35 % of k-space cut (half
    none), ghost amplitude 1-6 % (60 % none), texture 0-6 %."""
    out = {}
    for k, v in knobs.items():
        rng = rng_of(k)
        if v == "random":
            if k == "gfactor":
                v = 0.0 if rng.random() < 0.5 else rng.uniform(0.2, 1.5)
            elif k == "bias_strength":
                v = math.exp(rng.uniform(math.log(0.3), math.log(3.0)))
            elif k == "gibbs":
                v = 0.0 if rng.random() < 0.5 else rng.uniform(0.05, 0.35)
            elif k == "ghosting":
                v = 0.0 if rng.random() < 0.6 else rng.uniform(0.01, 0.06)
            elif k == "texture":
                v = rng.uniform(0.0, 0.06)
        out[k] = (float(v), rng)
    return out


def _smooth_unit_field(shape, rng, n_terms=4, fmax=1.2):
    """Smooth random field of separable low-frequency cosines, scaled to [0, 1]."""
    f = np.zeros(tuple(shape), np.float32)
    for _ in range(n_terms):
        c = [np.cos(np.pi * rng.uniform(0.2, fmax) * np.linspace(-1, 1, n)
                    + rng.uniform(0, 2 * np.pi)).astype(np.float32) for n in shape]
        f += np.float32(rng.normal()) * c[0][:, None, None] * c[1][None, :, None] * c[2][None, None, :]
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


def gfactor_map(shape, excess: float, rng):
    """Parallel-imaging noise amplification g >= 1 (1 + ``excess`` at its peak): highest near
    the centre of the field of view, where aliased points' coil sensitivities are most alike,
    modulated by a smooth random field."""
    idx = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    c = rng.uniform(-0.3, 0.3, 3)
    w = rng.uniform(0.4, 0.8)
    bump = np.exp(-(((idx[0][:, None, None] - c[0]) ** 2 + (idx[1][None, :, None] - c[1]) ** 2
                     + (idx[2][None, None, :] - c[2]) ** 2) / (2 * w * w)))
    u = 0.7 * bump + 0.3 * _smooth_unit_field(shape, rng)
    u = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    return (1.0 + excess * u).astype(np.float32)


def texture_field(shape, spacing, strength: float, rng, corr_mm=None):
    """Multiplicative small-scale texture exp(strength * n), n Gaussian-filtered white noise
    of unit std (correlation 0.7-2 mm): the microstructure that makes GM/WM grainy."""
    from scipy import ndimage as ndi

    corr = float(corr_mm if corr_mm is not None else rng.uniform(0.7, 2.0))
    n = ndi.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32),
                            corr / np.asarray(spacing, float))
    n /= max(float(n.std()), 1e-6)
    return np.exp(np.float32(strength) * n).astype(np.float32)


def gibbs_truncate(arr, fraction: float, axes=(0, 1)):
    """Keep the central ``1 - fraction`` of k-space along ``axes`` (zero-filled to the same
    grid): the acquired resolution is lower than the reconstructed one, so edges ring."""
    if fraction <= 0:
        return arr
    import scipy.fft as sfft

    spec = sfft.fftn(arr, axes=axes, workers=2)
    for a in axes:
        n = arr.shape[a]
        k = np.abs(np.fft.fftfreq(n))  # cycles per voxel, 0..0.5
        keep = (k <= 0.5 * (1.0 - fraction)).astype(np.float32)
        spec *= keep.reshape([-1 if q == a else 1 for q in range(arr.ndim)])
    out = sfft.ifftn(spec, axes=axes, workers=2)
    return out.astype(arr.dtype) if np.iscomplexobj(arr) else out.real.astype(arr.dtype)


def draw_ghost(rng) -> dict:
    """Phase-encode axis (0 or 1), global phase, kind (N/2 or motion-like) and motion period."""
    return dict(axis=int(rng.integers(2)), phase=float(rng.uniform(0, 2 * np.pi)),
                kind="nyquist" if rng.random() < 0.5 else "motion",
                period=int(rng.integers(3, 9)))


def ghost(arr, amplitude: float, axis: int = 1, kind: str = "nyquist", period: int = 4,
          phase: float = 0.0):
    """Phase-encode ghosts at low amplitude: an N/2 (Nyquist) ghost from alternating-line
    phase errors, or periodic motion-like replicas (amplitude / m at +-m N / period)."""
    if amplitude <= 0:
        return arr
    n = arr.shape[axis]
    ph = np.complex64(np.exp(1j * phase))
    out = arr.astype(np.complex64, copy=True)
    if kind == "nyquist":
        out += np.float32(amplitude) * ph * np.roll(arr, n // 2, axis=axis)
    else:
        for m in (1, 2):
            for s in (1, -1):
                out += (np.float32(amplitude / m / 2) * ph
                        * np.roll(arr, s * m * n // period, axis=axis))
    return out.astype(arr.dtype) if np.iscomplexobj(arr) else np.abs(out).astype(arr.dtype)


def acquisition_effects(app: dict, shape, spacing, brain):
    """From resolved knobs (``draw_acquisition``): the g-factor map (None when off) and a
    function applying texture (inside ``brain``, a fraction map), Gibbs truncation and ghosts
    to a noise-free complex signal; the same random fields for every signal it is applied to
    (the signal and the lesion-free signal)."""
    g, rng = app["gfactor"]
    gmap = gfactor_map(shape, g, rng) if g > 0 else None
    t, rng = app["texture"]
    tex = None
    if t > 0:
        tex = texture_field(shape, spacing, t, rng)
        tex = (1.0 + (tex - 1.0) * np.clip(brain, 0, 1)).astype(np.float32)
    gib = app["gibbs"][0]
    amp, rng = app["ghosting"]
    gh = draw_ghost(rng) if amp > 0 else None

    def apply(sig):
        if tex is not None:
            sig = sig * tex
        if gib > 0:
            sig = gibbs_truncate(sig, gib)
        if gh is not None:
            sig = ghost(sig, amp, **gh)
        return sig

    return gmap, apply


# ----------------------------------------------------------------------------------------------
# SWI
def draw_swi(filter_value, mask_value, mip_value, sigma_mm: float, power: int, rngs,
             width_value=None) -> dict:
    """Resolve the SWI knobs. 'random': filter Gaussian or Hann with width 1.5-6 mm; mask
    negative (60 %), positive or both-sided (20 % each) with power 2-6; mIP over 2-4 slices for
    40 % of subjects. ``width_value`` ('random': 1.5-6 mm from its own generator; a number: that
    width) sets the filter width whatever the filter: a domain that fixes the filter family
    (simulation/domains.py draws it from the allowed families) otherwise left every subject at
    ``sigma_mm``, so all domain data had one 3 mm high-pass."""
    if filter_value == "random":
        r = rngs("swi_filter")
        filter_value = SWI_FILTERS[int(r.integers(2))]
        sigma_mm = float(r.uniform(1.5, 6.0))
    _pick(filter_value, SWI_FILTERS, "swi_filter")
    if width_value == "random":
        sigma_mm = float(rngs("swi_filter_width").uniform(1.5, 6.0))
    elif width_value is not None:
        sigma_mm = float(width_value)
        if not sigma_mm > 0:
            raise ValueError(f"swi_filter_width={width_value!r}; expected a width > 0 (mm)")
    if mask_value == "random":
        r = rngs("swi_mask")
        mask_value = SWI_MASKS[int(r.choice(3, p=[0.6, 0.2, 0.2]))]
        power = int(r.integers(2, 7))
    _pick(mask_value, SWI_MASKS, "swi_mask")
    if mip_value == "random":
        r = rngs("swi_mip")
        mip_value = 0 if r.random() < 0.6 else int(r.integers(2, 5))
    return dict(filter=filter_value, sigma_mm=float(sigma_mm), mask=mask_value, power=int(power),
                mip=int(mip_value))


def gaussian_lowpass(sig, spacing, sigma_mm: float):
    """Gaussian low-pass (sigma in mm) of a complex volume at full resolution."""
    from scipy import ndimage as ndi

    s = sigma_mm / np.asarray(spacing, float)
    return ndi.gaussian_filter(sig.real, s) + 1j * ndi.gaussian_filter(sig.imag, s)


def hann_lowpass(sig, spacing, width_mm: float, axes=(0, 1)):
    """In-plane k-space Hann low-pass (vendor-style 2D homodyne): cos^2 window reaching zero at
    k_c = 0.44 / width_mm cycles/mm, so its spread matches a Gaussian of sigma ``width_mm``."""
    kc = 0.44 / float(width_mm)
    import scipy.fft as sfft

    spec = sfft.fftn(sig, axes=axes, workers=2)
    for a in axes:
        k = np.abs(np.fft.fftfreq(sig.shape[a], d=float(spacing[a])))
        win = np.where(k < kc, np.cos(np.pi * k / (2 * kc)) ** 2, 0.0).astype(np.float32)
        spec *= win.reshape([-1 if q == a else 1 for q in range(sig.ndim)])
    return sfft.ifftn(spec, axes=axes, workers=2).astype(np.complex64)


def phase_mask(phase, kind: str = "negative"):
    """SWI phase mask in [0, 1]: 'negative' darkens phi < 0 ((pi + phi)/pi; paramagnetic poles
    in this simulator's convention), 'positive' darkens phi > 0 (the other handedness),
    'both' darkens either sign ((pi - |phi|)/pi)."""
    if kind == "negative":
        return np.where(phase < 0, (np.pi + phase) / np.pi, 1.0).astype(np.float32)
    if kind == "positive":
        return np.where(phase > 0, (np.pi - phase) / np.pi, 1.0).astype(np.float32)
    if kind == "both":
        return ((np.pi - np.abs(phase)) / np.pi).astype(np.float32)
    raise ValueError(f"phase mask {kind!r}")


def min_intensity_projection(img, n_slices: int, axis: int = 2):
    """Sliding minimum over ``n_slices`` neighbouring slices (clinical SWI mIP), same grid."""
    if n_slices <= 1:
        return img
    from scipy import ndimage as ndi

    return ndi.minimum_filter1d(img, int(n_slices), axis=axis, mode="nearest")


def swi_image(sig, lowpass, power: int, mask: str = "negative", mip: int = 0):
    """High-pass phase arg(sig conj(lowpass)) and SWI = |sig| x mask^power (then mIP)."""
    phase = np.angle(sig * np.conj(lowpass)).astype(np.float32)
    swi = (np.abs(sig).astype(np.float32) * phase_mask(phase, mask) ** power).astype(np.float32)
    return phase, min_intensity_projection(swi, mip)


# ----------------------------------------------------------------------------------------------
# QSM
def draw_qsm(knobs: dict, rngs) -> dict:
    """Resolve the QSM knobs. 'random': recon current/TKD/Tikhonov alike (TKD threshold
    0.1-0.2, Tikhonov lambda 0.01-0.1 log-uniform); background residue 0.002-0.01 ppm of field
    for half the subjects; scale 0.6-1.3; offset +-0.03 ppm."""
    out = {}
    recon = knobs["qsm_recon"]
    r = rngs("qsm_recon")
    if recon == "random":
        recon = QSM_RECONS[int(r.integers(3))]
    _pick(recon, QSM_RECONS, "qsm_recon")
    out["recon"] = recon
    if recon == "tkd":
        out["threshold"] = float(r.uniform(0.1, 0.2))
    elif recon == "tikhonov":
        out["lambda"] = float(math.exp(r.uniform(math.log(0.01), math.log(0.1))))
    for k, draw in (("qsm_background",
                     lambda g: 0.0 if g.random() < 0.5 else g.uniform(0.002, 0.01)),
                    ("qsm_scale", lambda g: g.uniform(0.6, 1.3)),
                    ("qsm_offset_ppm", lambda g: g.uniform(-0.03, 0.03))):
        v = knobs[k]
        out[k] = float(draw(rngs(k)) if v == "random" else v)
    return out


def dipole_kernel(shape, spacing, b_dir, half: bool = False):
    """D(k) = 1/3 - (k.b)^2/|k|^2 on the FFT grid (D(0) = 0), the last axis halved for a real
    FFT when ``half``; ``b_dir`` in the grid's (i, j, k) frame."""
    b = np.asarray(b_dir, float) / np.linalg.norm(b_dir)
    k = [np.fft.fftfreq(n, d=float(s)) for n, s in zip(shape, spacing)]
    if half:
        k[2] = np.fft.rfftfreq(shape[2], d=float(spacing[2]))
    kx, ky, kz = k[0][:, None, None], k[1][None, :, None], k[2][None, None, :]
    k2 = kx * kx + ky * ky + kz * kz
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb * kb / k2
    d[0, 0, 0] = 0.0
    return d


def _padded(arr, pad):
    import scipy.fft as sfft

    shape = [sfft.next_fast_len(n + 2 * pad, real=True) for n in arr.shape]
    out = np.zeros(shape, np.float64)
    sl = tuple(slice(pad, pad + n) for n in arr.shape)
    out[sl] = arr
    return out, sl


def _kspace(x, spacing, b_dir, apply):
    """real FFT of ``x``, ``apply(spectrum, D)``, inverse real FFT."""
    import scipy.fft as sfft

    d = dipole_kernel(x.shape, spacing, b_dir, half=True)
    return sfft.irfftn(apply(sfft.rfftn(x, workers=2), d), s=x.shape, workers=2)


def forward_field(chi, spacing, b_dir, pad: int = 16):
    """Field dB/B0 (ppm) of ``chi`` (ppm) by zero-padded k-space dipole convolution."""
    x, sl = _padded(np.asarray(chi, np.float64), pad)
    return _kspace(x, spacing, b_dir, lambda f, d: f * d)[sl].astype(np.float32)


def tkd(field, spacing, b_dir, threshold: float = 0.15, pad: int = 16):
    """Truncated k-space division: chi = IFFT(FFT(field) / D_t), |D_t| = max(|D|, threshold)
    with D's sign. The truncated cone around the magic angle leaves streaks through strong
    sources and underestimates chi a little."""
    x, sl = _padded(np.asarray(field, np.float64), pad)

    def divide(f, d):
        return f / np.where(np.abs(d) < threshold, np.where(d < 0, -threshold, threshold), d)

    return _kspace(x, spacing, b_dir, divide)[sl].astype(np.float32)


def tikhonov(field, spacing, b_dir, lam: float = 0.05, pad: int = 16):
    """Closed-form Tikhonov inversion chi = IFFT(D FFT(field) / (D^2 + lambda)): smooth, no
    streaks, chi underestimated (more so for larger lambda)."""
    x, sl = _padded(np.asarray(field, np.float64), pad)
    return _kspace(x, spacing, b_dir, lambda f, d: f * d / (d * d + lam))[sl].astype(np.float32)


def background_residue(shape, amplitude: float, rng):
    """A smooth low-order (quadratic) field of peak |value| ``amplitude``: what an imperfect
    background-field removal leaves in the local field."""
    idx = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    terms = [idx[0], idx[1], idx[2], idx[0] * idx[1], idx[0] * idx[2], idx[1] * idx[2],
             idx[0] ** 2, idx[1] ** 2, idx[2] ** 2]
    f = sum(np.float32(rng.normal()) * t for t in terms)
    f = f - f.mean()
    return (f * np.float32(amplitude / max(float(np.abs(f).max()), 1e-9))).astype(np.float32)


#: Defaults of the QSM knobs: today's reconstruction (blurred true chi), nothing drawn.
QSM_DEFAULTS = dict(qsm_recon="current", qsm_background=0.0, qsm_scale=1.0, qsm_offset_ppm=0.0)


def qsm_variant(chi, brain, spacing, b_dir, v: dict, rng, white=None, field_noise_ppm=0.0,
                current_noise_ppm=0.0, blur_vox=0.6):
    """QSM of one reconstruction family (``v`` from ``draw_qsm``), before the brain erosion.

    'current' blurs the true ``chi`` (ppm, zero outside the brain); 'tkd' and 'tikhonov' first
    simulate the local field of ``chi`` (ideal background removal), add phase noise
    (``white`` x ``field_noise_ppm``, a std map in ppm of field) and the background residue,
    mask it to ``brain`` and invert it in k-space, so streaks and underestimation start at the
    strong sources as on clinical QSM. ``white`` is a standard-normal array (the simulator
    passes its main-stream draws, so the stream is consumed as before); ``rng`` draws the
    residue. Then the ppm scale and offset (inside ``brain``)."""
    from scipy import ndimage as ndi

    bg = v["qsm_background"]
    if v["recon"] == "current":
        q = ndi.gaussian_filter(chi, blur_vox)
        if white is not None:
            q += white * np.float32(current_noise_ppm)
        if bg > 0:  # a near-isotropic smooth field passes the inversion about x3 (1/D, D ~ 1/3)
            q += 3.0 * background_residue(chi.shape, bg, rng) * brain
    else:
        f = forward_field(chi, spacing, b_dir)
        if white is not None:
            f += white * np.asarray(field_noise_ppm, np.float32)
        if bg > 0:
            f += background_residue(chi.shape, bg, rng)
        f *= brain
        if v["recon"] == "tkd":
            q = tkd(f, spacing, b_dir, v["threshold"])
        else:
            q = tikhonov(f, spacing, b_dir, v["lambda"])
    if v["qsm_scale"] != 1.0:
        q = q * np.float32(v["qsm_scale"])
    if v["qsm_offset_ppm"] != 0.0:
        q = q + np.float32(v["qsm_offset_ppm"]) * brain
    return q.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# training-time intensity transform (not applied by the simulator)
def intensity_augment(image, mask, rng, gamma_range=(0.7, 1.4), warp: float = 0.15,
                      n_knots: int = 6):
    """Random monotone intensity transform for training: gamma (``gamma_range``) then a smooth
    monotone histogram warp (PCHIP through ``n_knots`` knots, each interval's slope varied by
    up to +-``warp``x), on the image rescaled to [0, 1] over ``mask``'s min..max and mapped
    back to that range. Monotone, so the rank order of voxels in ``mask`` is preserved: the
    network cannot rely on absolute intensity ratios but keeps "darker than its neighbours".

    Parameters: image (array), mask (bool array, same shape; None = everywhere; sets the range
    only), rng (np.random.Generator). Returns a float32 array; values outside the mask's range
    are unchanged."""
    from scipy.interpolate import PchipInterpolator

    img = np.asarray(image, np.float32)
    m = np.ones(img.shape, bool) if mask is None else np.asarray(mask, bool)
    if not np.any(m):
        return img.copy()
    lo, hi = float(img[m].min()), float(img[m].max())
    if hi <= lo:
        return img.copy()
    gamma = float(rng.uniform(*gamma_range))
    x = (img - lo) / (hi - lo)
    y = np.clip(x, 0.0, 1.0) ** gamma
    if warp > 0:
        knots = np.linspace(0.0, 1.0, n_knots)
        inc = np.diff(knots) * rng.uniform(1.0 - warp, 1.0 + warp, n_knots - 1)
        vals = np.concatenate([[0.0], np.cumsum(inc)])
        vals /= vals[-1]
        y = PchipInterpolator(knots, vals)(y)
    # f(0) = 0 and f(1) = 1: values outside the mask's range stay as they are, so the map is
    # continuous and monotone on the whole image
    out = np.where((x < 0) | (x > 1), img, lo + (hi - lo) * y)
    return out.astype(np.float32)
