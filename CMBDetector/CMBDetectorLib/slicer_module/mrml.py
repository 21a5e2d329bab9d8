"""The one adapter between MRML nodes and the engine (volumes in, fiducials and a table out).

Imports only ``slicer`` (the MRML/VTK classes, which slicer-core also provides), ``vtk`` and
``numpy``: no Qt, so it runs and is tested headless. Geometry crosses the border only as *world*
RAS millimetres: a volume's IJK-to-RAS is composed with its (linear) parent transforms, so
detections land where the user sees the scan even when it sits under a registration transform.
The result fiducials are placed in world RAS and carry no parent transform.

Review state lives in the fiducial node itself, so it survives scene save/load and a
``.mrk.json`` round trip: each control point's description is ``key=value`` pairs
(``status=accepted; confidence=0.931; volume_mm3=12.3; diameter_mm=2.87; candidate=12``);
rejected lesions are additionally *unselected* (drawn in the unselected colour, grey) and
accepted ones *locked*.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..engine.volume import Volume
from ..engine.naming import guess_modality  # noqa: F401  (the panel and scripts use mrml.guess_modality)

#: Node attributes that tie result nodes to their source volume (used to replace, not pile up).
ROLE_ATTR = "CMBDetector.Role"
SOURCE_ATTR = "CMBDetector.SourceVolumeID"
THRESHOLD_ATTR = "CMBDetector.Threshold"
MODALITY_ATTR = "CMBDetector.Modality"

FIDUCIAL_NAME = "CMB detections"
TABLE_NAME = "CMB lesions"
SEGMENTATION_NAME = "CMB lesion segmentation"

STATUSES = ("unreviewed", "accepted", "rejected", "added")
TABLE_COLUMNS = ("id", "R", "A", "S", "volume_mm3", "diameter_mm", "confidence", "status")
_STRING_COLUMNS = ("id", "status")
ADDED_PREFIX = "CMB-A"

# Colours (RGB 0-1): detections orange-red, rejected grey (the markups "unselected" colour).
COLOR_DETECTION = (1.0, 0.35, 0.1)
COLOR_REJECTED = (0.6, 0.6, 0.6)

MIN_SLICES = 3


# --- volumes --------------------------------------------------------------------------------
def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_ijk_to_ras(node) -> np.ndarray:
    """4x4 matrix from the node's voxel indices (i, j, k) to *world* RAS mm.

    Composes the node's own IJKToRAS with its parent transforms. Raises :class:`InputError` for
    a non-linear transform (warped grids have no 4x4; harden the transform first).
    """
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = _matrix_to_numpy(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{node.GetName()}: sits under a non-linear transform; harden it "
                             "(Data module, right-click > Harden transform) and try again")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _matrix_to_numpy(to_world) @ ijk_to_ras
    return ijk_to_ras


def _voxels(node) -> np.ndarray:
    img = node.GetImageData()
    dims = img.GetDimensions()
    scalars = img.GetPointData().GetScalars()
    arr = numpy_support.vtk_to_numpy(scalars)
    ncomp = img.GetNumberOfScalarComponents()
    shape = (dims[2], dims[1], dims[0]) if ncomp == 1 else (dims[2], dims[1], dims[0], ncomp)
    return np.array(arr.reshape(shape), copy=True)


def validate_volume_node(node) -> None:
    """Raise :class:`InputError` naming the problem if ``node`` is not a 3D scalar scan."""
    if node is None:
        raise InputError("no input volume selected")
    name = node.GetName() or node.GetID()
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = node.GetClassName().replace("vtkMRML", "").replace("Node", "")
        raise InputError(f"{name}: is a {kind}, not a scalar volume (select the SWI, T2*-GRE "
                         "or QSM scan)")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{name}: is a label map, not a scan; select the SWI, T2*-GRE or QSM "
                         "image (a label map can be used as the brain mask)")
    img = node.GetImageData()
    if img is None or img.GetPointData() is None or img.GetPointData().GetScalars() is None:
        raise InputError(f"{name}: holds no voxels (empty volume)")
    ncomp = img.GetNumberOfScalarComponents()
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") or ncomp != 1:
        raise InputError(f"{name}: has {ncomp} values per voxel (a vector, colour or 4D "
                         "volume); select a single 3D scalar scan, e.g. one echo or frame")
    dims = img.GetDimensions()
    if min(dims) < MIN_SLICES:
        d = sum(s > 1 for s in dims)
        raise InputError(f"{name}: is {d}D ({dims[0]}x{dims[1]}x{dims[2]} voxels); CMB "
                         f"detection needs a 3D scan with at least {MIN_SLICES} voxels along "
                         "every axis")


def volume_from_node(node) -> Volume:
    """Copy a scalar volume node into a :class:`Volume` with its world geometry.

    The node is never modified. Raises :class:`InputError` for 2D, 4D/vector, label-map,
    empty (no voxels or constant) or non-linearly transformed volumes.
    """
    validate_volume_node(node)
    name = node.GetName()
    array = _voxels(node)
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    if finite is not None and not finite.any():
        raise InputError(f"{name}: every voxel is NaN or infinite (empty volume)")
    values = array[finite] if finite is not None else array
    if values.min() == values.max():
        raise InputError(f"{name}: all voxels have the same value ({values.min()}); the volume "
                         "is empty")
    vol = Volume(array, world_ijk_to_ras(node), name)
    desc = series_description(node)
    if desc:
        vol.metadata["SeriesDescription"] = desc
    vol.metadata["source"] = f"MRML:{node.GetID()}"
    return vol


def series_description(node) -> str:
    """DICOM series description of a volume loaded from DICOM ("" when unknown)."""
    for key in ("DICOM.SeriesDescription", "SeriesDescription"):
        value = node.GetAttribute(key)
        if value:
            return value
    scene = node.GetScene()
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is not None:
        item = sh.GetItemByDataNode(node)
        if item:
            for key in ("DICOM.SeriesDescription", "SeriesDescription"):
                value = sh.GetItemAttribute(item, key)
                if value:
                    return value
    return ""


def _nearest_resample(labels: np.ndarray, labels_ijk_to_ras: np.ndarray,
                      reference: Volume) -> np.ndarray:
    """Nearest-neighbour sample ``labels`` ([k,j,i], own geometry) on ``reference``'s grid."""
    nk, nj, ni = reference.array.shape
    ras_to_src = np.linalg.inv(labels_ijk_to_ras) @ reference.ijk_to_ras
    out = np.zeros(reference.array.shape, np.uint8)
    sk, sj, si = labels.shape
    jj, ii = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    base = ras_to_src[:3, 0:1] * ii.ravel() + ras_to_src[:3, 1:2] * jj.ravel()
    for k in range(nk):  # one slice at a time keeps memory at O(slice)
        p = base + ras_to_src[:3, 2:3] * k + ras_to_src[:3, 3:4]
        idx = np.rint(p).astype(np.int64)
        ok = ((idx[0] >= 0) & (idx[0] < si) & (idx[1] >= 0) & (idx[1] < sj)
              & (idx[2] >= 0) & (idx[2] < sk))
        sl = np.zeros(nj * ni, np.uint8)
        sl[ok] = labels[idx[2, ok], idx[1, ok], idx[0, ok]] > 0
        out[k] = sl.reshape(nj, ni)
    return out


def mask_from_node(mask_node, reference: Volume) -> Volume | None:
    """Brain mask (segmentation or label map node) as a uint8 Volume on ``reference``'s grid.

    Any non-zero label / any segment counts as brain. Resampled (nearest neighbour) through
    world RAS, so the mask may have its own grid and parent transform.
    """
    if mask_node is None:
        return None
    name = mask_node.GetName()
    scene = mask_node.GetScene()
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        if mask_node.GetSegmentation().GetNumberOfSegments() == 0:
            raise InputError(f"{name}: the mask segmentation has no segments")
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CMBDetector temporary mask")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
                mask_node, tmp, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            if not ok or tmp.GetImageData() is None:
                raise InputError(f"{name}: could not convert the segmentation to a label map")
            labels, m = _voxels(tmp), world_ijk_to_ras(tmp)
            # The exported label map inherits no transform; apply the segmentation's own.
            parent = mask_node.GetParentTransformNode()
            if parent is not None:
                if not parent.IsTransformToWorldLinear():
                    raise InputError(f"{name}: sits under a non-linear transform; harden it")
                to_world = vtk.vtkMatrix4x4()
                parent.GetMatrixTransformToWorld(to_world)
                m = _matrix_to_numpy(to_world) @ _local_ijk_to_ras(tmp)
        finally:
            # the export also adds display/colour-table nodes: remove everything it created
            _remove_new_nodes(scene, before)
    elif mask_node.IsA("vtkMRMLScalarVolumeNode"):
        if mask_node.GetImageData() is None:
            raise InputError(f"{name}: the mask holds no voxels")
        labels, m = _voxels(mask_node), world_ijk_to_ras(mask_node)
        if labels.ndim != 3:
            raise InputError(f"{name}: the mask must be a single-component label map")
    else:
        raise InputError(f"{name}: a brain mask must be a segmentation or a label map")
    if reference.same_grid(Volume(labels, m)):
        out = (labels > 0).astype(np.uint8)
    else:
        out = _nearest_resample(labels, m, reference)
    if not out.any():
        raise InputError(f"{name}: the brain mask does not overlap the scan")
    return reference.with_array(out, name=name)


def _local_ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def _remove_new_nodes(scene, before: set) -> None:
    new = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in new:
        if node is not None and node.GetID() not in before:
            scene.RemoveNode(node)


def _remove_node_and_display(scene, node) -> None:
    if node is None or scene is None:
        return
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes")
                   else 0):
        d = node.GetNthDisplayNode(i)
        if d is not None:
            scene.RemoveNode(d)
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())
    scene.RemoveNode(node)


# --- review state encoded in control point descriptions -----------------------------------
def format_description(status: str, confidence=None, volume_mm3=None, diameter_mm=None,
                       candidate=None) -> str:
    parts = [f"status={status}"]
    if confidence is not None and math.isfinite(confidence):
        parts.append(f"confidence={confidence:.3f}")
    if volume_mm3 is not None and math.isfinite(volume_mm3):
        parts.append(f"volume_mm3={volume_mm3:.1f}")
    if diameter_mm is not None and math.isfinite(diameter_mm):
        parts.append(f"diameter_mm={diameter_mm:.2f}")
    if candidate is not None:
        parts.append(f"candidate={int(candidate)}")
    return "; ".join(parts)


def parse_description(text: str) -> dict:
    """Inverse of :func:`format_description`; unknown text gives ``{}`` (a hand-placed point)."""
    out: dict = {}
    for part in (text or "").split(";"):
        if "=" not in part:
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        if key == "status":
            out[key] = value if value in STATUSES else "unreviewed"
        elif key == "candidate":
            try:
                out[key] = int(value)
            except ValueError:
                pass
        elif key in ("confidence", "volume_mm3", "diameter_mm"):
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def point_info(fid, n: int) -> dict:
    """Everything known about control point ``n``: label, world RAS, status and measurements."""
    info = parse_description(fid.GetNthControlPointDescription(n))
    info.setdefault("status", "added")
    pos = [0.0, 0.0, 0.0]
    fid.GetNthControlPointPositionWorld(n, pos)
    info["label"] = fid.GetNthControlPointLabel(n)
    info["ras"] = tuple(float(v) for v in pos)
    return info


def get_status(fid, n: int) -> str:
    return point_info(fid, n)["status"]


def set_status(fid, n: int, status: str) -> None:
    """Mark control point ``n`` accepted / rejected / unreviewed (kept in node and table)."""
    if status not in STATUSES:
        raise InputError(f"unknown review status {status!r}; use one of {', '.join(STATUSES)}")
    info = parse_description(fid.GetNthControlPointDescription(n))
    if info.get("status") == "added" and status == "unreviewed":
        status = "added"
    info["status"] = status
    was = fid.StartModify()
    fid.SetNthControlPointDescription(n, format_description(
        status, info.get("confidence"), info.get("volume_mm3"), info.get("diameter_mm"),
        info.get("candidate")))
    _style_point(fid, n, status)
    fid.EndModify(was)


def _style_point(fid, n: int, status: str) -> None:
    fid.SetNthControlPointSelected(n, status != "rejected")
    fid.SetNthControlPointLocked(n, status == "accepted")


def adopt_added_points(fid) -> int:
    """Turn control points the reviewer placed by hand into ``added`` lesions.

    A point without a ``status=`` description is new: it gets status ``added`` and the next
    free label ``CMB-A<n>``. Returns how many were adopted.
    """
    used = set()
    for n in range(fid.GetNumberOfControlPoints()):
        label = fid.GetNthControlPointLabel(n)
        if label.startswith(ADDED_PREFIX) and label[len(ADDED_PREFIX):].isdigit():
            used.add(int(label[len(ADDED_PREFIX):]))
    adopted = 0
    was = fid.StartModify()
    for n in range(fid.GetNumberOfControlPoints()):
        if "status" in parse_description(fid.GetNthControlPointDescription(n)):
            continue
        nxt = 1
        while nxt in used:
            nxt += 1
        used.add(nxt)
        fid.SetNthControlPointLabel(n, f"{ADDED_PREFIX}{nxt}")
        fid.SetNthControlPointDescription(n, format_description("added"))
        _style_point(fid, n, "added")
        adopted += 1
    fid.EndModify(was)
    return adopted


# --- result nodes -----------------------------------------------------------------------------
def _scene_of(scene):
    if scene is not None:
        return scene
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: pass scene= or set slicer.mrmlScene")
    return scene


def find_result_nodes(scene, volume_node) -> dict:
    """This module's result nodes for ``volume_node``: ``{"fiducial", "table", "segmentation"}``."""
    found: dict = {}
    vid = volume_node.GetID() if not isinstance(volume_node, str) else volume_node
    for cls, role in (("vtkMRMLMarkupsFiducialNode", "fiducial"), ("vtkMRMLTableNode", "table"),
                      ("vtkMRMLSegmentationNode", "segmentation")):
        for node in nodes_by_class(scene, cls):
            if node.GetAttribute(ROLE_ATTR) == role and node.GetAttribute(SOURCE_ATTR) == vid:
                found[role] = node
    return found


def nodes_by_class(scene, cls: str) -> list:
    """The scene's nodes of class ``cls``. ``GetNodesByClass`` returns a collection the caller
    owns: without ``UnRegister`` every call would keep the nodes alive (a leak per slider tick)."""
    collection = scene.GetNodesByClass(cls)
    try:
        return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)


def remove_result_nodes(scene, volume_node) -> int:
    nodes = find_result_nodes(scene, volume_node)
    for node in nodes.values():
        _remove_node_and_display(scene, node)
    return len(nodes)


def _tag(node, role: str, volume_node) -> None:
    node.SetAttribute(ROLE_ATTR, role)
    node.SetAttribute(SOURCE_ATTR, volume_node.GetID())


def _new_fiducial(scene, volume_node):
    fid = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", FIDUCIAL_NAME)
    _tag(fid, "fiducial", volume_node)
    fid.SetControlPointLabelFormat(f"{ADDED_PREFIX}%d")
    fid.CreateDefaultDisplayNodes()
    disp = fid.GetDisplayNode()
    if disp is not None:
        disp.SetSelectedColor(*COLOR_DETECTION)
        disp.SetColor(*COLOR_REJECTED)
        disp.SetGlyphScale(2.0)
    return fid


def _new_table(scene, volume_node):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
    _tag(table, "table", volume_node)
    return table


#: A reviewed lesion keeps its status after a *new* detection run when a lesion is found again
#: within this distance (candidate numbers of two runs are unrelated).
REVIEW_MATCH_MM = 2.0


def review_state(fid) -> tuple[dict, list, list]:
    """Review of the current points: ``{candidate: status}``, ``[(ras, status)]`` of reviewed
    detections, and the hand-added points."""
    statuses: dict = {}
    positions: list = []
    added: list = []
    if fid is None:
        return statuses, positions, added
    for n in range(fid.GetNumberOfControlPoints()):
        info = point_info(fid, n)
        if "candidate" in info:
            statuses[info["candidate"]] = info["status"]
            if info["status"] != "unreviewed":
                positions.append((np.asarray(info["ras"]), info["status"]))
        else:
            added.append(info)
    return statuses, positions, added


def _status_near(ras, positions) -> str:
    best, status = REVIEW_MATCH_MM, "unreviewed"
    for pos, st in positions:
        d = float(np.linalg.norm(np.asarray(ras) - pos))
        if d <= best:
            best, status = d, st
    return status


def fill_fiducials(fid, lesions, statuses=None, added=None, positions=None) -> None:
    """Replace the control points by ``lesions`` (world RAS), restoring review statuses.

    ``statuses`` maps candidate numbers of the *same* result to statuses (re-threshold);
    ``positions`` lists ``(ras, status)`` matched by distance (a new run).
    """
    statuses = statuses or {}
    was = fid.StartModify()
    fid.RemoveAllControlPoints()
    for les in list(lesions):
        n = fid.AddControlPoint(vtk.vtkVector3d(*les.centroid_ras), les.label)
        if positions is not None:
            status = _status_near(les.centroid_ras, positions)
        else:
            status = statuses.get(les.candidate_index, "unreviewed")
        fid.SetNthControlPointDescription(n, format_description(
            status, les.confidence, les.volume_mm3, les.diameter_mm, les.candidate_index))
        _style_point(fid, n, status)
    for info in added or []:
        n = fid.AddControlPoint(vtk.vtkVector3d(*info["ras"]), info["label"])
        fid.SetNthControlPointDescription(n, format_description(
            "added", info.get("confidence"), info.get("volume_mm3"), info.get("diameter_mm")))
        _style_point(fid, n, "added")
    fid.EndModify(was)


LOCATION_TABLE_COLUMNS = ("category", "region", "side")


def fill_table(table, fid, exclude_rejected: bool = False, location: dict | None = None) -> None:
    """Rebuild the lesion table from the fiducial node: one row per control point.

    ``location`` maps control-point number (1-based) -> {category, region, side, ...}; when
    given, those columns are added (see :meth:`CMBDetectorLogic.locate`).
    """
    rows = [point_info(fid, n) for n in range(fid.GetNumberOfControlPoints())]
    for n, r in enumerate(rows, start=1):
        r["_n"] = n
    if exclude_rejected:
        rows = [r for r in rows if r["status"] != "rejected"]
    vt = vtk.vtkTable()
    cols = {}
    names = TABLE_COLUMNS + (LOCATION_TABLE_COLUMNS if location is not None else ())
    for name in names:
        if name in LOCATION_TABLE_COLUMNS:
            arr = vtk.vtkStringArray()
            arr.SetName(name)
            cols[name] = arr
            vt.AddColumn(arr)
            continue
        arr = vtk.vtkStringArray() if name in _STRING_COLUMNS else vtk.vtkDoubleArray()
        arr.SetName(name)
        cols[name] = arr
        vt.AddColumn(arr)
    for r in rows:
        cols["id"].InsertNextValue(r["label"])
        for name, value in zip("RAS", r["ras"]):
            cols[name].InsertNextValue(round(value, 2))
        for name in ("volume_mm3", "diameter_mm", "confidence"):
            cols[name].InsertNextValue(r.get(name, float("nan")))
        cols["status"].InsertNextValue(r["status"])
        if location is not None:
            loc = location.get(r["_n"], {})
            for name in LOCATION_TABLE_COLUMNS:
                cols[name].InsertNextValue(str(loc.get(name, "")))
    was = table.StartModify()
    table.SetAndObserveTable(vt)
    for name, unit, desc in (("R", "mm", "world RAS right"), ("A", "mm", "world RAS anterior"),
                             ("S", "mm", "world RAS superior"),
                             ("volume_mm3", "mm3", "lesion volume"),
                             ("diameter_mm", "mm", "equivalent-sphere diameter"),
                             ("confidence", "", "student network probability"),
                             ("status", "", "review: unreviewed/accepted/rejected/added"),
                             ("category", "", "MARS category: lobar, deep, infratentorial "
                              "(MNI registration; '?' near a boundary)"),
                             ("region", "", "atlas region"), ("side", "", "L, R or M")):
        if name not in names:
            continue
        if unit:
            table.SetColumnUnitLabel(name, unit)
        table.SetColumnDescription(name, desc)
    table.EndModify(was)


def table_rows(table) -> list:
    """Table content as a list of dicts (strings for id/status/location, floats otherwise)."""
    vt = table.GetTable()
    names = [vt.GetColumnName(c) for c in range(vt.GetNumberOfColumns())]
    rows = []
    for r in range(vt.GetNumberOfRows()):
        row = {}
        for c, name in enumerate(names):
            v = vt.GetValue(r, c)
            text = name in _STRING_COLUMNS or name in LOCATION_TABLE_COLUMNS
            row[name] = v.ToString() if text else v.ToDouble()
        rows.append(row)
    return rows


def publish_result(scene, volume_node, result, threshold=None, keep_review: bool = True,
                   new_run: bool = True) -> dict:
    """Show ``result`` for ``volume_node``: reuse (or create) its fiducial and table nodes.

    Re-running on the same volume replaces the previous lesions in the same nodes (no node
    pile-up). With ``keep_review`` the hand-added points are kept, and review statuses follow
    their lesions: by candidate number when only the threshold changed (``new_run=False``), by
    position (within ``REVIEW_MATCH_MM``) after a new run. Returns
    ``{"fiducial", "table", "lesions"}``.
    """
    scene = _scene_of(scene)
    t = result.threshold if threshold is None else float(threshold)
    nodes = find_result_nodes(scene, volume_node)
    fid, table = nodes.get("fiducial"), nodes.get("table")
    statuses, positions, added = review_state(fid) if keep_review else ({}, [], [])
    if fid is None:
        fid = _new_fiducial(scene, volume_node)
    if table is None:
        table = _new_table(scene, volume_node)
    lesions = result.lesions(t)
    fill_fiducials(fid, lesions, statuses, added, positions if new_run else None)
    fid.SetAttribute(THRESHOLD_ATTR, f"{t:.4f}")
    fid.SetAttribute(MODALITY_ATTR, result.modality)
    fill_table(table, fid)
    seg = nodes.get("segmentation")
    if seg is not None:  # a stale segmentation would contradict the new lesions
        _remove_node_and_display(scene, seg)
    return {"fiducial": fid, "table": table, "lesions": lesions}


def scene_signature(scene) -> list:
    """ID, class and name of every node (to test that "the scene is unchanged")."""
    out = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        out.append((node.GetID(), node.GetClassName(), node.GetName()))
    return out


# --- export / import --------------------------------------------------------------------------
def _copy_fiducial(fid, exclude_rejected: bool):
    """A scene-less copy of ``fid`` for writing (optionally without rejected points)."""
    out = slicer.vtkMRMLMarkupsFiducialNode()
    out.SetName(fid.GetName())
    for n in range(fid.GetNumberOfControlPoints()):
        info = point_info(fid, n)
        if exclude_rejected and info["status"] == "rejected":
            continue
        m = out.AddControlPoint(vtk.vtkVector3d(*info["ras"]), info["label"])
        out.SetNthControlPointDescription(m, fid.GetNthControlPointDescription(n))
        out.SetNthControlPointSelected(m, fid.GetNthControlPointSelected(n))
        out.SetNthControlPointLocked(m, fid.GetNthControlPointLocked(n))
    return out


def export_markups(fid, path, exclude_rejected: bool = False) -> str:
    """Write the fiducials as Slicer ``.mrk.json`` (world coordinates, review in descriptions)."""
    path = str(path)
    node = _copy_fiducial(fid, exclude_rejected)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(node):
        raise InputError(f"{path}: could not write markups")
    return path


def export_table(fid, path, exclude_rejected: bool = False) -> str:
    """Write the lesion table as CSV (plus Slicer's ``.schema.csv`` with column types)."""
    path = str(path)
    table = slicer.vtkMRMLTableNode()
    fill_table(table, fid, exclude_rejected)
    storage = slicer.vtkMRMLTableStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(table):
        raise InputError(f"{path}: could not write table")
    return path


def review_label_map(result, fid, exclude_rejected: bool = False) -> np.ndarray:
    """Lesion labels on the input grid matching the fiducial list (value n = n-th point + 1).

    Hand-added lesions have no voxels (only a position) and are absent from the label map.
    """
    out = np.zeros(result.shape, np.uint16)
    if result.candidate_labels is None:
        return out
    lut = np.zeros(int(result.candidate_labels.max()) + 1, np.uint16)
    for n in range(fid.GetNumberOfControlPoints()):
        info = point_info(fid, n)
        cand = info.get("candidate")
        if cand is None or cand >= lut.size:
            continue
        if exclude_rejected and info["status"] == "rejected":
            continue
        lut[cand] = n + 1
    return lut[result.candidate_labels]


def image_data_from_array(array: np.ndarray):
    """``vtkImageData`` from a ``[k, j, i]`` (or ``[k, j, i, c]``) numpy array (deep copy)."""
    arr = np.ascontiguousarray(array)
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    flat = arr.reshape(-1, arr.shape[3]) if arr.ndim == 4 else arr.ravel()
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        flat, deep=True, array_type=numpy_support.get_vtk_array_type(arr.dtype)))
    return img


def set_ijk_to_ras(node, ijk_to_ras: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(ijk_to_ras[r, c]))
    node.SetIJKToRASMatrix(m)


def _labelmap_node(labels: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image_data_from_array(labels))
    set_ijk_to_ras(node, ijk_to_ras)
    return node


def export_segmentation(result, fid, path, exclude_rejected: bool = False) -> str:
    """Write the lesion label map (``.nii.gz``/``.nrrd``, world geometry; value = row number)."""
    path = str(path)
    labels = review_label_map(result, fid, exclude_rejected)
    node = _labelmap_node(labels, np.asarray(result.ijk_to_ras, float), "CMB lesions")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        raise InputError(f"{path}: could not write the lesion segmentation")
    return path


def add_segmentation_node(scene, volume_node, result, fid, exclude_rejected: bool = False):
    """Show the lesions as a segmentation node (one segment per lesion, named like its point)."""
    scene = _scene_of(scene)
    old = find_result_nodes(scene, volume_node).get("segmentation")
    if old is not None:
        _remove_node_and_display(scene, old)
    labels = review_label_map(result, fid, exclude_rejected)
    tmp = _labelmap_node(labels, np.asarray(result.ijk_to_ras, float), "CMB lesions (labels)")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", SEGMENTATION_NAME)
    _tag(seg, "segmentation", volume_node)
    seg.CreateDefaultDisplayNodes()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    scene.AddNode(tmp)
    try:
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, seg)
        segmentation = seg.GetSegmentation()
        for s in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(s)
            value = segment.GetLabelValue()
            if 1 <= value <= fid.GetNumberOfControlPoints():
                segment.SetName(fid.GetNthControlPointLabel(value - 1))
    finally:
        _remove_new_nodes(scene, before)
    return seg


def read_markups(path, scene=None):
    """Read a ``.mrk.json`` through Slicer's JSON storage node (into ``scene`` when given)."""
    node = slicer.vtkMRMLMarkupsFiducialNode()
    if scene is not None:
        scene.AddNode(node)
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    if scene is not None:
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise InputError(f"{path}: could not read markups")
    return node


def read_table(path, scene=None):
    """Read a CSV (with its ``.schema.csv``) through Slicer's table storage node."""
    node = slicer.vtkMRMLTableNode()
    if scene is not None:
        scene.AddNode(node)
    storage = slicer.vtkMRMLTableStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise InputError(f"{path}: could not read table")
    return node


def write_review_json(fid, path) -> str:
    """Small machine-readable summary of the review (label, RAS, status) for scripts."""
    rows = []
    for n in range(fid.GetNumberOfControlPoints()):
        info = point_info(fid, n)
        rows.append({"label": info["label"], "ras": list(info["ras"]),
                     "status": info["status"], "confidence": info.get("confidence")})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)) or ".", suffix=".part")
    with os.fdopen(fd, "w") as fh:
        json.dump({"lesions": rows}, fh, indent=1)
    os.replace(tmp, path)
    return str(path)
