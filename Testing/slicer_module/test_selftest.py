"""The in-Slicer test's scenarios on slicer-core, run the way ctest runs ``CMBDetectorTest``:
each on its own, in alphabetical order, after ``scene.Clear()`` of one shared scene."""
from __future__ import annotations

import pytest

pytest.importorskip("slicer")

from CMBDetectorLib.slicer_module import selftest  # noqa: E402
from slicer_scene_helpers import make_app  # noqa: E402


@pytest.fixture(scope="module")
def shared_scene():
    scene, _app, _logics = make_app()
    yield scene
    scene.Clear(1)


@pytest.mark.parametrize("name", sorted(selftest.SCENARIOS))
def test_scenario_after_clear(shared_scene, name):
    shared_scene.Clear(0)
    selftest.SCENARIOS[name](shared_scene)


def test_module_test_methods_are_the_scenarios():
    """Every scenario is a ``test_*`` method of ``CMBDetectorTest`` (checked in the module's
    source, which needs Slicer's Qt to import)."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "CMBDetector" / "CMBDetector.py"
    tree = ast.parse(src.read_text())
    test = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMBDetectorTest")
    methods = {f.name for f in test.body if isinstance(f, ast.FunctionDef)}
    assert {f"test_{name}" for name in selftest.SCENARIOS} <= methods
