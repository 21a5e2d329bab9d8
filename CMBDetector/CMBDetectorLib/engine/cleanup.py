"""Morphological clean-up in millimetres (the method's third step).

Rules, each a named setting of :class:`~CMBDetectorLib.engine.settings.DetectionSettings`:

* volume outside ``[min_volume_mm3, max_volume_mm3]`` -> ``"too small"`` / ``"too large"``;
* elongation above ``max_elongation`` -> ``"elongated"`` (vein segments are tubes; CMBs are
  round or mildly ovoid). Elongation is ``1 - sqrt(l_min / l_max)`` of the component's inertia
  tensor in physical coordinates, so voxel anisotropy does not fake elongation; on a
  projection over slices (an mIP, :mod:`~CMBDetectorLib.engine.projection`) it is measured
  across the projection axis, which stretches every focus;
* centroid closer than ``min_edge_distance_mm`` to the brain-mask boundary -> ``"brain edge"``
  (pial veins, sinus and skull-base artefacts).

The reference code measured all of this in voxels and looked at 2D slices only.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def shape_features(labels: np.ndarray, n: int, spacing_mm, across=None) -> tuple:
    """Per component 1..n: volume (mm^3) and elongation (0 = sphere, -> 1 = line).

    ``across``: a unit vector in ``(k, j, i)`` millimetres (a projection's axis,
    :mod:`~CMBDetectorLib.engine.projection`); elongation is then measured in the plane
    orthogonal to it, because the projection stretches every focus along it."""
    flatten = None
    if across is not None:
        u = np.asarray(across, float)
        u = u / np.linalg.norm(u)
        flatten = np.eye(3) - np.outer(u, u)
    sp = np.asarray(spacing_mm, float)[::-1]  # (k, j, i)
    vox_vol = float(np.prod(sp))
    volume = np.zeros(n)
    elong = np.zeros(n)
    if n == 0:
        return volume, elong
    objs = ndi.find_objects(labels, n)
    for idx, sl in enumerate(objs):
        if sl is None:
            continue
        pts = np.argwhere(labels[sl] == idx + 1).astype(float) * sp
        volume[idx] = len(pts) * vox_vol
        if len(pts) < 3:
            continue
        cov = np.cov(pts.T) + np.diag(sp ** 2 / 12.0)  # a voxel's own extent
        if flatten is not None:  # the in-plane tensor; its zero eigenvalue (along u) dropped
            cov = flatten @ cov @ flatten
            ev = np.clip(np.linalg.eigvalsh(cov)[1:], 1e-9, None)
        else:
            ev = np.clip(np.linalg.eigvalsh(cov), 1e-9, None)
        elong[idx] = 1.0 - np.sqrt(ev[0] / ev[-1])
    return volume, elong


def edge_distance(mask: np.ndarray, centres_kji: np.ndarray, spacing_mm) -> np.ndarray:
    """Distance (mm) from each centre's voxel to the nearest voxel outside the brain mask:
    the mask's Euclidean distance transform at the centres, computed for the centres only.

    The nearest outside voxel of a mask voxel always touches the mask (its neighbour one step
    towards the centre would otherwise be outside and nearer), so a k-d tree of the outside
    voxels that touch the mask answers exactly what the whole-volume transform did, in a
    third of its time (0.28 s against 0.93 s for a 144x204x174 brain under load)."""
    from scipy.spatial import cKDTree

    if len(centres_kji) == 0:
        return np.zeros(0)
    mask = np.asarray(mask, bool)
    sampling = np.asarray(spacing_mm, float)[::-1]  # (k, j, i)
    idx = np.clip(np.rint(centres_kji).astype(int), 0, np.array(mask.shape) - 1)
    shell = ndi.binary_dilation(mask, np.ones((3, 3, 3), bool)) & ~mask
    if not shell.any():  # no voxel outside the mask: the transform's own convention
        dist = ndi.distance_transform_edt(mask, sampling=sampling)
        return dist[idx[:, 0], idx[:, 1], idx[:, 2]]
    inside = mask[idx[:, 0], idx[:, 1], idx[:, 2]]
    out = np.zeros(len(idx))  # outside the mask: 0, as the transform gives
    if inside.any():
        tree = cKDTree(np.argwhere(shell) * sampling)
        out[inside] = tree.query(idx[inside] * sampling)[0]
    return out


def verdicts(volume_mm3, elongation, voxels, edge_mm, settings) -> list:
    """Clean-up verdict per candidate: ``""`` when kept, otherwise the first failed rule."""
    out = []
    for v, e, nv, d in zip(volume_mm3, elongation, voxels, edge_mm):
        if v < settings.min_volume_mm3:
            out.append("too small")
        elif v > settings.max_volume_mm3:
            out.append("too large")
        elif nv >= settings.elongation_min_voxels and e > settings.max_elongation:
            out.append("elongated")
        elif d < settings.min_edge_distance_mm:
            out.append("brain edge")
        else:
            out.append("")
    return out
