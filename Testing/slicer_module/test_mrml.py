"""MRML adapter on a real slicer-core scene: geometry, input validation, masks, review encoding."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from CMBDetectorLib.slicer_module import mrml  # noqa: E402
from CMBDetectorLib.errors import InputError  # noqa: E402
from slicer_scene_helpers import (scan, scene,  # noqa: F401 (fixtures)
                                  add_linear_transform, add_volume, make_app,  # noqa: E402
                                  rotation, synthetic_scan)




def test_volume_from_node_keeps_voxels_and_oblique_geometry(scene, scan):
    arr, m, _ = scan
    node = add_volume(scene, arr, m)
    vol = mrml.volume_from_node(node)
    assert vol.array.shape == arr.shape
    assert np.array_equal(vol.array, arr)
    assert np.allclose(vol.ijk_to_ras, m, atol=1e-6)
    assert np.allclose(vol.spacing, [0.8, 0.9, 1.8], atol=1e-6)
    # a copy: editing it must not touch the node's voxels
    vol.array[0, 0, 0] = -1
    assert mrml.volume_from_node(node).array[0, 0, 0] == arr[0, 0, 0]


def test_parent_transform_is_composed_into_world_geometry(scene, scan):
    arr, m, _ = scan
    node = add_volume(scene, arr, m)
    t = np.eye(4)
    t[:3, :3] = rotation((5.0, 10.0, -25.0))
    t[:3, 3] = [12.0, -7.5, 30.0]
    tnode = add_linear_transform(scene, t)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    vol = mrml.volume_from_node(node)
    assert np.allclose(vol.ijk_to_ras, t @ m, atol=1e-6)
    # cross-check against Slicer's own world mapping of one voxel
    import vtk

    ijk = (10, 20, 5)
    local = m @ np.array([*ijk, 1.0])
    gen = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(tnode, None, gen)
    world = gen.TransformPoint(local[:3])
    assert np.allclose(vol.ijk_to_ras_points(ijk)[0], world, atol=1e-6)


def test_nonlinear_transform_is_refused(scene, scan):
    arr, m, _ = scan
    node = add_volume(scene, arr, m)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        mrml.volume_from_node(node)


@pytest.mark.parametrize("case,pattern", [
    ("2d", "2D"), ("4d", "values per voxel"), ("vector", "values per voxel"),
    ("label", "label map"), ("empty", "empty"), ("constant", "same value"), ("novoxels", "no voxels"),
    ("model", "not a scalar volume"), ("none", "no input volume")])
def test_bad_input_gives_clear_error(scene, case, pattern):
    rng = np.random.default_rng(1)
    if case == "2d":
        node = add_volume(scene, rng.random((1, 32, 32)).astype(np.float32), np.eye(4))
    elif case == "4d":  # a multi-frame series arrives as a multi-component volume
        node = add_volume(scene, rng.random((8, 16, 16, 5)).astype(np.float32), np.eye(4),
                          cls="vtkMRMLVectorVolumeNode")
    elif case == "vector":
        node = add_volume(scene, rng.random((8, 16, 16, 3)).astype(np.float32), np.eye(4))
    elif case == "label":
        node = add_volume(scene, (rng.random((8, 16, 16)) > 0.5).astype(np.uint8), np.eye(4),
                          cls="vtkMRMLLabelMapVolumeNode")
    elif case == "empty":
        node = add_volume(scene, np.full((8, 16, 16), np.nan, np.float32), np.eye(4))
    elif case == "constant":
        node = add_volume(scene, np.zeros((8, 16, 16), np.int16), np.eye(4))
    elif case == "novoxels":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "blank")
    elif case == "model":
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    else:
        node = None
    with pytest.raises(InputError, match=pattern) as err:
        mrml.volume_from_node(node)
    assert "\n" not in str(err.value)


def test_labelmap_mask_on_other_grid_is_resampled_through_ras(scene, scan):
    arr, m, _ = scan
    node = add_volume(scene, arr, m)
    vol = mrml.volume_from_node(node)
    # mask: axis-aligned 1 mm grid covering a RAS box |R|<10, |A|<10, |S|<10
    mm = np.eye(4)
    mm[:3, 3] = [-30, -30, -30]
    lab = np.zeros((61, 61, 61), np.uint8)
    lab[20:41, 20:41, 20:41] = 1
    mask_node = add_volume(scene, lab, mm, name="brain", cls="vtkMRMLLabelMapVolumeNode")
    mask = mrml.mask_from_node(mask_node, vol)
    assert mask.array.shape == arr.shape and mask.same_grid(vol)
    kk, jj, ii = np.nonzero(mask.array)
    ras = vol.ijk_to_ras_points(np.stack([ii, jj, kk], 1))
    assert np.abs(ras).max() <= 10.5 + 1e-6
    outside = vol.ijk_to_ras_points(np.argwhere(mask.array == 0)[:, ::-1])
    assert (np.abs(outside).max(axis=1) >= 9.5).all()


@pytest.mark.parametrize("transformed", [False, True])
def test_segmentation_mask(scene, scan, transformed):
    arr, m, _ = scan
    node = add_volume(scene, arr, m)
    lab = np.zeros(arr.shape, np.uint8)
    lab[5:20, 10:50, 10:50] = 1
    lab_node = add_volume(scene, lab, m, name="lab", cls="vtkMRMLLabelMapVolumeNode")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain seg")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab_node, seg)
    if transformed:  # scan and mask moved together by one registration transform
        t = np.eye(4)
        t[:3, :3] = rotation((10.0, 0.0, -20.0))
        t[:3, 3] = [7.0, -3.0, 11.0]
        tnode = add_linear_transform(scene, t)
        node.SetAndObserveTransformNodeID(tnode.GetID())
        seg.SetAndObserveTransformNodeID(tnode.GetID())
    vol = mrml.volume_from_node(node)
    n_before = scene.GetNumberOfNodes()
    mask = mrml.mask_from_node(seg, vol)
    assert scene.GetNumberOfNodes() == n_before  # temporary label map removed
    assert np.array_equal(mask.array > 0, lab > 0)


def test_guess_modality_from_names():
    assert mrml.guess_modality("sub-01_swi") == "swi"
    assert mrml.guess_modality("7: SWI_Images") == "swi"
    assert mrml.guess_modality("QSM_chimap") == "qsm"
    assert mrml.guess_modality("", "Susceptibility map (QSM)") == "qsm"
    assert mrml.guess_modality("t2star_gre_3d") == "gre"
    assert mrml.guess_modality("T2* hemo") == "gre"
    assert mrml.guess_modality("T1_MPRAGE") is None


def test_description_round_trip_and_status_style(scene):
    d = mrml.format_description("accepted", 0.9312, 12.34, 2.871, 7)
    info = mrml.parse_description(d)
    assert info == {"status": "accepted", "confidence": 0.931, "volume_mm3": 12.3,
                    "diameter_mm": 2.87, "candidate": 7}
    fid = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fid.AddControlPoint([1, 2, 3], "CMB-1")
    fid.SetNthControlPointDescription(0, d)
    mrml.set_status(fid, 0, "rejected")
    assert mrml.get_status(fid, 0) == "rejected"
    assert not fid.GetNthControlPointSelected(0) and not fid.GetNthControlPointLocked(0)
    mrml.set_status(fid, 0, "accepted")
    assert fid.GetNthControlPointSelected(0) and fid.GetNthControlPointLocked(0)
    with pytest.raises(InputError):
        mrml.set_status(fid, 0, "maybe")


def test_demo_scan_truth_lands_on_dark_voxels_when_read_by_slicer(scene):
    """Slicer's reader and the simulator agree on where the demo's CMBs are (world RAS)."""
    import json
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "CMBDetector/Resources/SampleData/CMBDemo_SWI.nii.gz"
    if not demo.exists():
        pytest.skip("demo scan not bundled yet")
    vlogic = slicer.vtkSlicerVolumesLogic()
    vlogic.SetMRMLScene(scene)
    node = vlogic.AddArchetypeVolume(str(demo), "CMBDemo_SWI")
    assert mrml.guess_modality(node.GetName()) == "swi"
    vol = mrml.volume_from_node(node)
    truth = json.loads(demo.with_name("CMBDemo_SWI_truth.json").read_text())["cmbs"]
    assert truth
    median = float(np.median(vol.array[vol.array > 0]))
    for cmb in truth:
        i, j, k = np.rint(vol.ras_to_ijk_points(cmb["centre_ras"])[0]).astype(int)
        assert 0 <= k < vol.array.shape[0] and 0 <= j < vol.array.shape[1] \
            and 0 <= i < vol.array.shape[2]
        patch = vol.array[max(k - 1, 0):k + 2, max(j - 1, 0):j + 2, max(i - 1, 0):i + 2]
        assert patch.min() < 0.8 * median, (cmb["id"], patch.min(), median)
