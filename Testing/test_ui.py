"""Static checks of the Slicer module: .ui file, module source, build and catalog files.

``CMBDetector.py`` needs Slicer's Qt (absent from slicer-core), so it is checked by parsing:
Python 3.9 syntax, every ``ui.<name>`` it uses exists in the .ui file, every parameter-node field
bound in the .ui exists, and the build lists every engine file and resource (unlisted files are
not packaged).
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CMBDetector"
SOURCE = MODULE / "CMBDetector.py"
UI = MODULE / "Resources" / "UI" / "CMBDetector.ui"


@pytest.fixture(scope="module")
def tree():
    return ast.parse(SOURCE.read_text(), feature_version=(3, 9))


@pytest.fixture(scope="module")
def ui_widgets():
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    return {w.get("name"): w for w in root.iter("widget")}


def test_module_source_is_python39_and_has_the_four_classes(tree):
    compile(SOURCE.read_text(), str(SOURCE), "exec")
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"CMBDetector", "CMBDetectorWidget", "CMBDetectorLogic", "CMBDetectorTest",
            "CMBDetectorParameterNode"} <= set(classes)
    bases = {n: [ast.unparse(b) for b in c.bases] for n, c in classes.items()}
    assert bases["CMBDetector"] == ["ScriptedLoadableModule"]
    assert bases["CMBDetectorTest"] == ["ScriptedLoadableModuleTest"]
    assert "ScriptedLoadableModuleWidget" in bases["CMBDetectorWidget"]


def test_every_ui_name_used_by_the_code_exists(tree, ui_widgets):
    used = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui"):
            used.add(node.attr)
    # names checked by string in the in-Slicer test
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            vals = [e.value for e in node.elts]
            if "detectButton" in vals:
                used |= set(vals)
    assert len(used) >= 15
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"used in CMBDetector.py but absent from the .ui: {missing}"


def test_required_controls_exist(ui_widgets):
    classes = {n: w.get("class") for n, w in ui_widgets.items()}
    assert classes["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert classes["maskSelector"] == "qMRMLNodeComboBox"
    assert classes["thresholdSlider"] == "ctkSliderWidget"
    assert classes["resultsTableView"] == "qMRMLTableView"
    assert classes["progressBar"] == "QProgressBar"
    items = lambda name: [i.find("property/string").text for i in ui_widgets[name].findall("item")]  # noqa: E731
    assert items("modalityComboBox") == ["SWI", "T2*-GRE", "QSM"]
    assert items("deviceComboBox") == ["Auto", "CPU", "GPU"]
    mask_types = [s.text for s in ui_widgets["maskSelector"].findall(
        "property[@name='nodeTypes']/stringlist/string")]
    assert set(mask_types) == {"vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"}


def test_bound_parameters_exist_in_parameter_node(tree, ui_widgets):
    pn = next(n for n in tree.body if isinstance(n, ast.ClassDef)
              and n.name == "CMBDetectorParameterNode")
    fields = {s.target.id for s in pn.body if isinstance(s, ast.AnnAssign)}
    bound = {}
    for name, w in ui_widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= fields, set(bound.values()) - fields
    assert {"inputVolume", "modality", "mask", "threshold", "device"} <= set(bound.values())
    # the modality choices the controller knows are the combo box's items
    from CMBDetectorLib.slicer_module.panel import MODALITY_LABELS

    items = [i.find("property/string").text for i in ui_widgets["modalityComboBox"].findall("item")]
    assert tuple(items) == MODALITY_LABELS


def test_every_control_the_controller_drives_exists(ui_widgets):
    """The widget enables/disables controls by the names the controller gives."""
    from CMBDetectorLib.slicer_module.panel import INPUT_CONTROLS, REVIEW_CONTROLS

    names = set(INPUT_CONTROLS + REVIEW_CONTROLS + ("detectButton", "cancelButton"))
    assert names <= set(ui_widgets), names - set(ui_widgets)


def test_category_is_slicers_own_and_contributors_agree(tree):
    """The category is translated in Slicer's context (one shared category in every language);
    contributors are "Name (Org)" and the same in the module, CMake and the .s4ext."""
    module = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMBDetector")
    cat = next(n for n in ast.walk(module) if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]) == "self.parent.categories")
    call = cat.value.elts[0]
    assert ast.unparse(call.func) == "translate"
    assert [a.value for a in call.args] == ["qSlicerAbstractCoreModule", "Quantification"]
    contributors = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                        and getattr(n.targets[0], "id", "") == "CONTRIBUTORS")
    names = [e.value for e in contributors.elts]
    assert names and all(re.fullmatch(r"[^()]+ \([^()]+\)", n) for n in names), names
    cm = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()))
    assert cm["EXTENSION_CONTRIBUTORS"] == ", ".join(names)


def test_icon_is_128_png():
    data = (MODULE / "Resources" / "Icons" / "CMBDetector.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def _cmake_list(text, var):
    m = re.search(rf"set\({var}\s+(.*?)\)", text, re.S)
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]


SHIPPED_PACKAGES = ("engine", "slicer_module", "location")
RESEARCH_PACKAGES = ("cli", "cohort", "simulation", "training", "evaluation")


def _shipped_scripts():
    text = (MODULE / "CMakeLists.txt").read_text()
    return [s.replace("${MODULE_NAME}", "CMBDetector")
            for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]


def test_module_cmake_lists_what_slicer_runs_and_every_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text
    scripts = _shipped_scripts()
    resources = [s.replace("${MODULE_NAME}", "CMBDetector")
                 for s in _cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    lib = MODULE / "CMBDetectorLib"
    shipped = {f"CMBDetectorLib/{p.relative_to(lib)}" for p in lib.glob("*.py")}
    for pkg in SHIPPED_PACKAGES:
        shipped |= {f"CMBDetectorLib/{p.relative_to(lib)}" for p in (lib / pkg).glob("*.py")}
    assert "CMBDetector.py" in scripts
    assert shipped == set(scripts) - {"CMBDetector.py"}, (
        f"not packaged: {sorted(shipped - set(scripts))}; not Slicer's: "
        f"{sorted(set(scripts) - shipped - {'CMBDetector.py'})} (MODULE_PYTHON_SCRIPTS in "
        "CMBDetector/CMakeLists.txt)")
    for pkg in RESEARCH_PACKAGES:
        assert (lib / pkg / "__init__.py").is_file(), pkg
        assert not any(s.startswith(f"CMBDetectorLib/{pkg}/") for s in scripts), pkg
    for rel in scripts + resources:
        assert (MODULE / rel).is_file(), f"listed but missing: {rel}"
    on_disk = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
               if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts}
    assert on_disk <= set(resources), (f"not packaged: {sorted(on_disk - set(resources))}; "
                                       "add to MODULE_PYTHON_RESOURCES in "
                                       "CMBDetector/CMakeLists.txt")


def test_what_slicer_packages_runs_on_its_own(tmp_path):
    """Only the listed files, copied alone (as the extension installs them), import and run
    the panel's scenarios: nothing Slicer runs needs the research tooling."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("slicer")
    root = tmp_path / "qt-scripted-modules"
    for rel in _shipped_scripts():
        if rel.startswith("CMBDetectorLib/"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MODULE / rel, root / rel)
    shutil.copytree(MODULE / "Resources", root / "Resources")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import CMBDetectorLib; "
            "assert CMBDetectorLib.__file__.startswith(sys.argv[1]), CMBDetectorLib.__file__; "
            "import CMBDetectorLib.slicer_module.logic, CMBDetectorLib.slicer_module.panel, "
            "CMBDetectorLib.slicer_module.worker, CMBDetectorLib.location.report; "
            "from CMBDetectorLib.slicer_module import selftest; import slicer; "
            "scene = slicer.vtkMRMLScene(); "
            "[(scene.Clear(0), f(scene)) for n, f in sorted(selftest.SCENARIOS.items()) "
            "if n != 'cancel_kills_the_worker']; "
            "bad = [m for m in sys.modules if m.split('.')[:2] in (['CMBDetectorLib', p] for p in "
            f"{RESEARCH_PACKAGES!r})]; assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-1500:]


def test_extension_metadata_agrees():
    cm = (ROOT / "CMakeLists.txt").read_text()
    var = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', cm))
    assert "project(CMBDetector)" in cm and "find_package(Slicer REQUIRED)" in cm
    assert "add_subdirectory(CMBDetector)" in cm and "Slicer_EXTENSION_CPACK" in cm
    assert var["EXTENSION_DEPENDS"] == "PyTorch"
    s4 = {}
    for line in (ROOT / "CMBDetector.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4[key] = value.strip()
    for key in ("scm", "scmurl", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "screenshoturls", "description", "enabled"):
        assert key in s4, key
    assert s4["homepage"] == var["EXTENSION_HOMEPAGE"]
    assert s4["category"] == var["EXTENSION_CATEGORY"]
    assert s4["depends"] == var["EXTENSION_DEPENDS"]
    assert s4["iconurl"] == var["EXTENSION_ICONURL"]
    assert s4["description"] == var["EXTENSION_DESCRIPTION"]
    assert s4["contributors"] == var["EXTENSION_CONTRIBUTORS"]
    assert var["EXTENSION_ICONURL"].endswith("CMBDetector/Resources/Icons/CMBDetector.png")
    cat = json.loads((ROOT / "CMBDetector.json").read_text())
    assert cat["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert {"category", "scm_url"} <= set(cat)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type",
               "build_dependencies", "build_subdirectory", "enabled", "tier"}
    assert set(cat) <= allowed
    assert cat["category"] == var["EXTENSION_CATEGORY"]
    assert cat["build_dependencies"] == var["EXTENSION_DEPENDS"].split()
    assert cat["scm_url"] == s4["scmurl"]


def test_demo_sample_data_checksum_matches():
    demo = MODULE / "Resources" / "SampleData" / "CMBDemo_SWI.nii.gz"
    tree = ast.parse(SOURCE.read_text())
    value = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "DEMO_SHA256")
    if not demo.exists():
        assert value is None  # nothing registered for a file that is not there
        pytest.skip("demo scan not bundled yet")
    assert value == hashlib.sha256(demo.read_bytes()).hexdigest(), \
        "update DEMO_SHA256 in CMBDetector.py to the demo scan's sha256"
