"""Shared helpers for the headless Slicer tests (not a test file).

A real MRML scene with the application and module logics registered the way trame-slicer's
``SlicerApp`` does, plus node builders. The synthetic scan and the stand-in detector live in
``CMBDetectorLib.slicer_module.standins`` so the in-Slicer test can use them too.
"""
from __future__ import annotations

import pytest

from CMBDetectorLib.slicer_module.standins import (TRUTH, add_linear_transform, add_volume,  # noqa: F401
                                     dark_blob_detector, rotation, slow_detector,
                                     synthetic_scan)


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


@pytest.fixture()
def scene():
    """A fresh scene with the module logics, cleared after the test."""
    sc, app, logics = make_app()
    yield sc
    sc.Clear(1)


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan()
