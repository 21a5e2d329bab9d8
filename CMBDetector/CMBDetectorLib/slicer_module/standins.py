"""Stand-ins for tests: a synthetic oblique scan with known lesions and a dark-blob "detector".

Used by the headless pytest suite and by the in-Slicer ``CMBDetectorTest`` (which cannot see the
repository's ``Testing`` folder), so the full MRML path can be exercised without trained
weights. The stand-in detector reads the voxels and geometry it is given (it does not return
the truth), so a geometry mistake anywhere on the path makes the tests fail. Not a model: never
used for real detection.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import Cancelled
from ..engine.results import Candidate, DetectionResult

# Truth in the volume's local RAS (mm) and the blob contrast (fractional signal drop), which the
# stand-in reports as confidence, so thresholds 0.5 / 0.7 keep 4 / 2 of the 5 lesions.
TRUTH = [((4.0, -6.0, 3.0), 2.5, 0.90), ((-14.0, 10.0, -4.0), 2.0, 0.80),
         ((16.0, 14.0, 6.0), 2.0, 0.65), ((-8.0, -16.0, 8.0), 3.0, 0.55),
         ((10.0, -18.0, -8.0), 2.0, 0.35)]


def rotation(ax_deg=(20.0, -12.0, 30.0)) -> np.ndarray:
    a, b, c = (math.radians(v) for v in ax_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def synthetic_scan(shape_ijk=(64, 60, 26), spacing=(0.8, 0.9, 1.8), seed=0):
    """Oblique, anisotropic scan: array [k,j,i], 4x4 IJK->RAS, truth (local RAS, radius, drop).

    The grid is centred on RAS (0, 0, 0); each sphere darkens the signal by its ``drop`` with a
    1-voxel partial-volume rim.
    """
    rng = np.random.default_rng(seed)
    direction = rotation()
    spacing = np.asarray(spacing, float)
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    centre_ijk = (np.asarray(shape_ijk, float) - 1) / 2
    m[:3, 3] = -m[:3, :3] @ centre_ijk
    ni, nj, nk = shape_ijk
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    ras = ijk @ m[:3, :3].T + m[:3, 3]
    img = np.full(len(ras), 1000.0)
    img += 40 * np.sin(ras[:, 0] / 15.0) + 30 * np.cos(ras[:, 1] / 20.0)  # smooth bias
    for centre, radius, drop in TRUTH:
        d = np.linalg.norm(ras - np.asarray(centre), axis=1)
        w = np.clip(radius + 0.5 - d, 0.0, 1.0)  # partial volume over ~1 mm
        img *= 1.0 - drop * w
    img += rng.normal(0, 10, len(img))
    return img.reshape(nk, nj, ni).astype(np.float32), m, [
        {"centre_ras": c, "radius_mm": r, "drop": d} for c, r, d in TRUTH]


def dark_blob_detector(volume, modality, mask=None, settings=None, progress=None, cancel=None):
    """Stand-in for the engine: connected dark blobs of the voxels it is given.

    Confidence = fractional signal drop at the blob's darkest voxel (relative to the median),
    centroid = drop-weighted voxel centroid mapped through ``volume.ijk_to_ras``.
    """
    from scipy import ndimage

    if progress:
        progress("candidates", 0.1)
    if cancel is not None and cancel():
        raise Cancelled("detection cancelled")
    a = volume.array.astype(np.float64)
    ref = ndimage.median_filter(a, size=(3, 7, 7))
    drop = np.clip(1.0 - a / np.maximum(ref, 1e-6), 0.0, 1.0)
    if mask is not None:
        drop = drop * (mask.array > 0)
    labels, n = ndimage.label(drop > 0.2)
    if progress:
        progress("student", 0.6)
    voxel_mm3 = float(np.prod(volume.spacing))
    cands = []
    for idx in range(1, n + 1):
        sel = labels == idx
        count = int(sel.sum())
        if count < 2:
            labels[sel] = 0
            continue
        kk, jj, ii = np.nonzero(sel)
        w = drop[sel]
        ijk = np.array([np.average(ii, weights=w), np.average(jj, weights=w),
                        np.average(kk, weights=w)])
        ras = volume.ijk_to_ras_points(ijk)[0]
        conf = float(np.clip(w.max() / 0.9 * 0.9, 0, 1))
        cands.append(Candidate(index=idx, centroid_ras=tuple(ras), centroid_ijk=tuple(ijk),
                               volume_mm3=count * voxel_mm3, candidate_probability=conf,
                               confidence=conf))
    if cancel is not None and cancel():
        raise Cancelled("detection cancelled")
    if progress:
        progress("clean-up", 1.0)
    t = 0.5 if settings is None else settings.threshold
    return DetectionResult(modality=modality, ijk_to_ras=volume.ijk_to_ras.copy(),
                           shape=volume.array.shape, candidates=cands,
                           candidate_labels=labels.astype(np.int32), threshold=t,
                           model_version="stand-in dark-blob finder")


#: environment variable: a file where :func:`slow_detector` writes its process id, so a test can
#: check that Cancel killed the real worker (not only the launcher in front of it)
PIDFILE_ENV = "CMBDETECTOR_TEST_PIDFILE"


def slow_detector(volume, modality, mask=None, settings=None, progress=None, cancel=None):
    """Stand-in that takes ~30 s unless cancelled (for the subprocess-kill test)."""
    import os

    if os.environ.get(PIDFILE_ENV):
        with open(os.environ[PIDFILE_ENV], "w") as fh:
            fh.write(str(os.getpid()))
    for step in range(300):
        if progress:
            progress("waiting", step / 300)
        time.sleep(0.1)
    return dark_blob_detector(volume, modality, mask, settings, progress, cancel)


def add_volume(scene, array, ijk_to_ras, name="sub-01_swi", cls="vtkMRMLScalarVolumeNode"):
    """Volume node from numpy (the path ``slicer.util.addVolumeFromArray`` takes)."""
    from .mrml import image_data_from_array, set_ijk_to_ras

    node = scene.AddNewNodeByClass(cls, name)
    node.SetAndObserveImageData(image_data_from_array(array))
    set_ijk_to_ras(node, ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def add_linear_transform(scene, matrix, name="registration"):
    """A linear transform node holding the 4x4 ``matrix`` (to parent)."""
    import vtk

    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    t.SetMatrixTransformToParent(m)
    return t


def gpu_fallback_detector(volume, modality, mask=None, settings=None, progress=None,
                          cancel=None):
    """The dark-blob stand-in reporting what the engine reports after a CUDA out-of-memory
    fallback (device used: cpu, one warning), to test that the warning reaches the user."""
    result = dark_blob_detector(volume, modality, mask, settings, progress, cancel)
    result.device = "cpu"
    result.warnings = ["CUDA out of memory; retrying on the CPU"]
    return result
