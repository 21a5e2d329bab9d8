"""Head anatomy for the simulator: the MNI152 2009 templates shipped inside the nilearn wheel.

The wheel holds a skull-stripped T1 (so its non-zero voxels are the brain mask, CSF included) and
grey/white-matter probability maps at 1 mm (``*_tal_nlin_sym_09a_converted.nii.gz``). Everything
else the simulator needs is derived here once per process and cached:

* CSF = brain mask minus GM minus WM (ventricles, sulci) plus a thin subarachnoid rim;
* skull and scalp as shells at given distances outside the closed brain hull;
* air-filled sinuses (frontal, ethmoid, sphenoid, mastoid) as MNI ellipsoids outside the brain;
* deep grey nuclei (caudate, putamen, globus pallidus, thalamus, substantia nigra, red nucleus,
  dentate) as MNI-coordinate ellipsoids intersected with the template's tissue maps;
* CMB candidate positions per category (lobar, deep, infratentorial), each at least half
  surrounded by parenchyma (Greenberg 2009 criterion).

The template voxel grid is RAS with unit spacing, so template index = MNI mm - ``origin``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: nucleus -> (label, MNI centre of the right-hemisphere copy (x>0), semi-axes mm, iron chi ppm
#: range, tissue gate). Mirrored to x<0 with label+1. Coordinates from standard MNI atlases.
NUCLEI = {
    "caudate": (1, (13.0, 12.0, 10.0), (5.0, 9.0, 8.0), (0.05, 0.09), "gm"),
    "putamen": (3, (25.0, 2.0, 1.0), (5.5, 14.0, 8.0), (0.05, 0.10), "gm"),
    "globus_pallidus": (5, (19.0, -3.0, -1.0), (4.0, 8.0, 5.0), (0.12, 0.17), "brain"),
    "thalamus": (7, (11.0, -18.0, 7.0), (7.5, 12.0, 7.5), (0.05, 0.07), "gm"),
    "substantia_nigra": (9, (10.0, -18.0, -12.0), (3.5, 7.0, 2.5), (0.10, 0.17), "brain"),
    "red_nucleus": (11, (5.0, -20.0, -8.0), (3.0, 3.5, 3.0), (0.08, 0.15), "brain"),
    "dentate": (13, (15.0, -57.0, -35.0), (6.0, 8.0, 5.0), (0.08, 0.15), "brain"),
}
NUCLEUS_OF_LABEL = {}
for _name, (_lab, *_rest) in NUCLEI.items():
    NUCLEUS_OF_LABEL[_lab] = (_name, "right")
    NUCLEUS_OF_LABEL[_lab + 1] = (_name, "left")

#: air sinuses: name -> (MNI centre, semi-axes mm); kept only outside the brain.
SINUSES = {
    "frontal": ((0.0, 66.0, 4.0), (14.0, 7.0, 11.0)),
    "ethmoid": ((0.0, 42.0, -30.0), (11.0, 16.0, 10.0)),
    "sphenoid": ((0.0, 14.0, -40.0), (12.0, 11.0, 9.0)),
    "mastoid_right": ((52.0, -34.0, -44.0), (9.0, 11.0, 9.0)),
    "mastoid_left": ((-52.0, -34.0, -44.0), (9.0, 11.0, 9.0)),
}


def template_dir() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@dataclass
class Template:
    """Template-space (1 mm RAS) maps used by the simulator, all indexed [x, y, z]."""

    origin: np.ndarray  # MNI mm of voxel (0,0,0)
    gm: np.ndarray  # float32 0..1
    wm: np.ndarray
    brain: np.ndarray  # float32 0..1 (T1 > 0)
    d_out: np.ndarray  # float32, mm outside the closed brain hull (<=0 inside)
    sinus: np.ndarray  # float32 0..1 air-sinus fraction
    nuclei: np.ndarray  # uint8 labels (NUCLEI)
    candidates: dict = field(default_factory=dict)  # category -> (N,3) MNI mm
    sulcal: np.ndarray | None = None  # (N,3) MNI mm of sulcal CSF voxels (pial vein seeds)
    periventricular: np.ndarray | None = None  # (N,3) MNI mm of WM next to the ventricles
    hull_top: dict = field(default_factory=dict)  # y (mm) -> top z (mm) of the hull at x=0
    nuclei_frac: np.ndarray | None = None  # (len(NUCLEI), bx, by, bz) smooth L+R fractions
    nuclei_lo: np.ndarray | None = None  # template index of nuclei_frac[:, 0, 0, 0]

    def to_index(self, mni):
        return np.asarray(mni, float) - self.origin

    def to_mni(self, idx):
        return np.asarray(idx, float) + self.origin


def _ellipsoid(shape, origin, centre, axes):
    x, y, z = [np.arange(n, dtype=np.float32) + o for n, o in zip(shape, origin)]
    return (((x - centre[0]) / axes[0])[:, None, None] ** 2
            + ((y - centre[1]) / axes[1])[None, :, None] ** 2
            + ((z - centre[2]) / axes[2])[None, None, :] ** 2) <= 1.0


def category_of(mni) -> tuple[str, str]:
    """Category ('lobar' | 'deep' | 'infratentorial') and region name of an MNI point."""
    x, y, z = (float(v) for v in mni)
    side = "right" if x >= 0 else "left"
    if bool(_infratentorial(x, y, z)):
        if abs(x) < 14 and y > -48:
            return "infratentorial", "brainstem"
        return "infratentorial", f"cerebellum_{side}"
    for name, (lab, c, ax, _, _) in NUCLEI.items():
        if name in ("dentate", "substantia_nigra", "red_nucleus"):
            continue
        q = ((abs(x) - c[0]) / (ax[0] + 2)) ** 2 + ((y - c[1]) / (ax[1] + 2)) ** 2 + \
            ((z - c[2]) / (ax[2] + 2)) ** 2
        if q <= 1.0:
            return "deep", f"{name}_{side}"
    if _deep_box(x, y, z):
        return "deep", f"deep_white_matter_{side}"
    if y < -72 or (y < -55 and z < 10 and abs(x) < 40):
        lobe = "occipital"
    elif z < 0 and abs(x) > 28 and y < 20:
        lobe = "temporal"
    elif y < -25 + 0.3 * z and z > 0:
        lobe = "parietal"
    else:
        lobe = "frontal"
    return "lobar", f"{lobe}_{side}"


def _infratentorial(x, y, z):
    """Below the tentorium (cerebellum) or in the brainstem; works on scalars and arrays.

    The tentorium follows the straight sinus in the midline (z ~ 5 mm at y = -48 falling to
    ~0 at y = -100) and slopes down laterally to the petrous ridges / transverse sinuses."""
    x, y, z = (np.asarray(v, float) for v in (x, y, z))
    z_tent = 5.0 - 0.1 * (-y - 48.0) - 0.5 * np.abs(x)
    cerebellum = (y < -42) & (z < z_tent) & ~((np.abs(x) > 40) & (y > -55))
    brainstem = (np.abs(x) < 15) & (y >= -48) & (y <= -8) & (z < -12)
    return cerebellum | brainstem


def _deep_box(x, y, z):
    return abs(x) < 30 and -35 < y < 25 and -4 < z < 24


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and derive all template maps (about 3-5 s once per process)."""
    import nibabel as nib
    from scipy import ndimage as ndi

    d = template_dir()
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    imgs = {k: nib.load(str(d / name.format(k))) for k in ("t1", "gm", "wm")}
    aff = imgs["t1"].affine
    if not np.allclose(aff[:3, :3], np.eye(3)):
        # Reorient to RAS unit spacing if a future nilearn ships another layout.
        imgs = {k: nib.as_closest_canonical(v) for k, v in imgs.items()}
        aff = imgs["t1"].affine
    origin = aff[:3, 3].astype(float)
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    brain = ndi.binary_fill_holes(t1 > 0)
    brain_f = brain.astype(np.float32)
    tot = gm + wm
    scale = np.where(tot > 1.0, 1.0 / np.maximum(tot, 1e-6), 1.0).astype(np.float32)
    gm *= scale * brain_f
    wm *= scale * brain_f
    shape = t1.shape
    d_out = hull_distance(brain, ndi)
    sinus = np.zeros(shape, bool)
    for c, ax in SINUSES.values():
        sinus |= _ellipsoid(shape, origin, c, ax)
    sinus &= ~ndi.binary_dilation(brain, iterations=2)
    sinus_f = ndi.gaussian_filter(sinus.astype(np.float32), 0.7)
    nuclei = np.zeros(shape, np.uint8)
    for nm, (lab, c, ax, _, gate) in NUCLEI.items():
        g = (gm > 0.3) if gate == "gm" else ((gm + wm) > 0.5)
        for sgn, l in ((1, lab), (-1, lab + 1)):
            e = _ellipsoid(shape, origin, (sgn * c[0], c[1], c[2]), ax) & g & (nuclei == 0)
            nuclei[e] = l
    tpl = Template(origin, gm, wm, brain_f, d_out, sinus_f, nuclei)
    derive_structures(tpl, brain, ndi)
    return tpl


def derive_structures(tpl: Template, brain, ndi) -> None:
    """What the simulator reads besides the maps: each nucleus's smoothed fraction on a crop
    around the nuclei, and the candidate sites per category (any template or anatomy)."""
    nz = np.argwhere(tpl.nuclei > 0)
    lo, hi = nz.min(0) - 3, nz.max(0) + 4
    crop = tpl.nuclei[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    tpl.nuclei_lo = lo
    tpl.nuclei_frac = np.stack([
        ndi.gaussian_filter(((crop == lab) | (crop == lab + 1)).astype(np.float32), 0.8)
        for (lab, *_r) in NUCLEI.values()])
    _derive_candidates(tpl, brain, ndi)


def hull_distance(brain: np.ndarray, ndi) -> np.ndarray:
    """Signed distance (mm on the 1 mm template grid) to the closed hull of the brain (brain +
    outer sulci): positive outside (CSF rim, skull, scalp), negative inside."""
    shape = brain.shape
    small = brain[::2, ::2, ::2]
    hull_s = ndi.binary_closing(np.pad(small, 6), ndi.generate_binary_structure(3, 1),
                                iterations=5)[6:-6, 6:-6, 6:-6]
    hull_s = ndi.binary_fill_holes(hull_s)
    d_s = ndi.distance_transform_edt(~hull_s) * 2.0 - ndi.distance_transform_edt(hull_s) * 2.0
    d_out = ndi.zoom(d_s.astype(np.float32), np.array(shape) / np.array(small.shape), order=1)
    d_out = d_out[: shape[0], : shape[1], : shape[2]]
    if d_out.shape != shape:
        d_out = np.pad(d_out, [(0, s - t) for s, t in zip(shape, d_out.shape)], mode="edge")
    return np.where(brain, np.minimum(d_out, 0.0), np.maximum(d_out, 0.0)).astype(np.float32)


def _derive_candidates(tpl: Template, brain, ndi) -> None:
    paren = tpl.gm + tpl.wm
    surround = ndi.gaussian_filter(paren, 2.0)
    ok = (paren > 0.7) & (surround > 0.75) & (tpl.d_out < -3)
    idx = np.argwhere(ok[::2, ::2, ::2]) * 2
    mni = tpl.to_mni(idx)
    cats = {"lobar": [], "deep": [], "infratentorial": []}
    x, y, z = mni.T
    infra = _infratentorial(x, y, z)
    nuc = tpl.nuclei[idx[:, 0], idx[:, 1], idx[:, 2]]
    deepbox = (np.abs(x) < 30) & (y > -35) & (y < 25) & (z > -4) & (z < 24)
    deep = ~infra & (((nuc > 0) & (nuc < 9)) | (deepbox & (tpl.wm[idx[:, 0], idx[:, 1], idx[:, 2]]
                                                          > 0.6)))
    gmv = tpl.gm[idx[:, 0], idx[:, 1], idx[:, 2]]
    lobar = ~infra & ~deep & ~deepbox & (gmv > 0.25) & (z > -45)
    tpl.candidates = {"lobar": mni[lobar], "deep": mni[deep], "infratentorial": mni[infra]}
    csf = tpl.brain - paren
    depth = ndi.distance_transform_edt(brain[::2, ::2, ::2]) * 2.0
    depth = ndi.zoom(depth.astype(np.float32), 2, order=1)[: brain.shape[0], : brain.shape[1],
                                                           : brain.shape[2]]
    depth = np.pad(depth, [(0, s - t) for s, t in zip(brain.shape, depth.shape)], mode="edge")
    sul = (csf > 0.5) & (depth > 1.0) & (depth < 12) & (tpl.d_out < 0)
    si = np.argwhere(sul[::2, ::2, ::2]) * 2
    tpl.sulcal = tpl.to_mni(si)
    vent = (csf > 0.6) & (depth > 18)
    vent = ndi.binary_opening(vent, iterations=1)
    pv = ndi.binary_dilation(vent, iterations=3) & ~vent & (tpl.wm > 0.6)
    pi = np.argwhere(pv[::2, ::2, ::2]) * 2
    tpl.periventricular = tpl.to_mni(pi)
    # top of the closed hull along the midline, for the superior sagittal sinus
    xi = int(round(-tpl.origin[0]))
    col = tpl.d_out[xi] <= 0
    for yi in range(0, col.shape[0], 4):
        zs = np.nonzero(col[yi])[0]
        if len(zs):
            tpl.hull_top[float(yi + tpl.origin[1])] = float(zs.max() + tpl.origin[2])


class SubjectWarp:
    """Subject RAS <-> template MNI: scaling, rotation, shift and a smooth random displacement.

    ``to_template(x_subject) = A^-1(x_subject) + u(x_subject)`` where ``u`` is a sum of a few
    long-wavelength sinusoids (analytic, so it can be evaluated at any point); the inverse is
    solved by fixed-point iteration (u is small and smooth, so it converges in a few steps).
    """

    def __init__(self, rng: np.random.Generator | None, deform_mm=3.0, scale=(0.9, 1.1),
                 rotation_deg=8.0, centre=(0.0, -18.0, 15.0)):
        self.c0 = np.asarray(centre, float)
        if rng is None:
            self.lin = np.eye(3)
            self.modes = []
            self.shift = np.zeros(3)
        else:
            s = np.diag(rng.uniform(*scale) * rng.uniform(0.96, 1.04, 3))
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            ang = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg))
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            rot = np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * k @ k
            self.lin = rot @ s
            self.shift = rng.normal(0, 2.0, 3)
            self.modes = []
            for _ in range(4):
                kv = rng.normal(size=3)
                kv = kv / np.linalg.norm(kv) / rng.uniform(60.0, 150.0)
                amp = rng.normal(size=3)
                amp = amp / np.linalg.norm(amp) * deform_mm * rng.uniform(0.3, 1.0) / 2.0
                self.modes.append((kv, rng.uniform(0, 2 * np.pi), amp))
        self.lin_inv = np.linalg.inv(self.lin)

    def displacement(self, x):
        x = np.asarray(x, float)
        u = np.zeros_like(x)
        for kv, ph, amp in self.modes:
            u += np.sin(2 * np.pi * (x @ kv) + ph)[..., None] * amp
        return u

    def to_template(self, x_subject):
        x = np.asarray(x_subject, float)
        return (x - self.c0 - self.shift) @ self.lin_inv.T + self.c0 + self.displacement(x)

    def to_subject(self, x_template, iterations=6):
        t = np.asarray(x_template, float)
        x = (t - self.c0) @ self.lin.T + self.c0 + self.shift
        for _ in range(iterations):
            x = (t - self.displacement(x) - self.c0) @ self.lin.T + self.c0 + self.shift
        return x
