"""Shared helpers for the headless Slicer tests (not a test file).

A real MRML scene with the application and module logics registered the way trame-slicer's
``SlicerApp`` does, plus node builders. The synthetic scan and the stand-in detector live in
``CMBDetectorLib.standins`` so the in-Slicer test can use them too.
"""
from __future__ import annotations

import numpy as np
import pytest

from CMBDetectorLib.standins import (TRUTH, dark_blob_detector, rotation,  # noqa: F401
                                     slow_detector, synthetic_scan)


def make_app():
    """Scene + application logic + Colors/Volumes/Markups/Tables/Segmentations logics."""
    import slicer

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetName("default")
    scene.AddNode(crosshair)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    import vtk

    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    logics = {}
    app.SetModuleLogic("Colors", app.GetColorLogic())
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("Tables", slicer.vtkSlicerTablesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, app, logics


def add_volume(scene, array, ijk_to_ras, name="sub-01_swi", cls="vtkMRMLScalarVolumeNode"):
    """Volume node from numpy (the same path slicer.util.addVolumeFromArray takes)."""
    from CMBDetectorLib.mrml import image_data_from_array, set_ijk_to_ras

    node = scene.AddNewNodeByClass(cls, name)
    node.SetAndObserveImageData(image_data_from_array(array))
    set_ijk_to_ras(node, ijk_to_ras)
    node.CreateDefaultDisplayNodes()
    return node


def add_linear_transform(scene, matrix, name="registration"):
    import vtk

    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    t.SetMatrixTransformToParent(m)
    return t


@pytest.fixture()
def scene():
    """A fresh scene with the module logics, cleared after the test."""
    sc, app, logics = make_app()
    yield sc
    sc.Clear(1)


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan()
