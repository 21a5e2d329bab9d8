"""Just enough of Slicer's GUI layer to import ``CMBDetector.py`` and drive its widget headless.

slicer-core has the MRML scene and ``slicer.util`` but no Qt, ``ScriptedLoadableModule``,
``parameterNodeWrapper`` or ``slicer.app``. This harness supplies strict stand-ins for those
(a widget accepts only the calls the module is expected to make, so a typo in the module fails
the test) over a *real* MRML scene, so the widget's wiring (signals in, controller calls, what
it shows) is tested, not only the controller behind it. Not a test file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "CMBDetector"


class FakeWidget:
    """A Qt widget: records connections, holds the state the module sets."""

    def __init__(self, name: str, cls: str = ""):
        self.name, self.cls = name, cls
        self.enabled, self.text, self.toolTip = True, "", ""
        self.value, self.format = 0, ""
        self.table = self.current = self.scene = None
        self.selectedRows: list = []
        self.placeMultipleMarkups = None
        self.parameterName = ""    # the .ui's SlicerParameterName property
        self.bound = None          # the parameter wrapper while connectGui is in effect
        self._slots: dict = {}

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        """Call the slots as PythonQt does: with as many of the signal's arguments as the
        slot accepts."""
        import inspect

        for slot in self._slots.get(signal, []):
            params = inspect.signature(slot).parameters.values()
            if any(p.kind == p.VAR_POSITIONAL for p in params):
                slot(*args)
            else:
                slot(*args[:len([p for p in params if p.default is p.empty])])

    def setValue(self, value) -> None:
        self.value = value

    def setFormat(self, text: str) -> None:
        self.format = text

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def setMRMLTableNode(self, table) -> None:
        self.table = table

    def setCurrentNode(self, node) -> None:
        """A node selector bound to a parameter updates it, as connectGui's binding does."""
        changed = node is not self.current
        self.current = node
        if changed and self.bound is not None:
            setattr(self.bound, self.parameterName, node)

    def setSelectionBehavior(self, value) -> None:
        pass

    def setEditTriggers(self, value) -> None:
        pass

    def selectionModel(self):
        rows = self.selectedRows
        return types.SimpleNamespace(selectedIndexes=lambda: [
            types.SimpleNamespace(row=lambda r=r: r) for r in rows])


class FakeTimer:
    def __init__(self):
        self.active, self.interval, self._slot = False, 0, None

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        assert signal == "timeout()", signal
        self._slot = slot

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        if self.active:
            self._slot()


def ui_widgets() -> dict:
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "CMBDetector.ui").getroot()
    out = {}
    for w in root.iter("widget"):
        fake = out[w.get("name")] = FakeWidget(w.get("name"), w.get("class"))
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                fake.parameterName = prop.find("string").text
    return out


def parameter_node_wrapper(cls):
    """``@parameterNodeWrapper``: typed fields over a scripted module node; setting one fires
    the node's ModifiedEvent (what the widget observes)."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            store = getattr(node, "_cmb_values", None)
            if store is None:
                store = dict(defaults)
                node._cmb_values = store
            object.__setattr__(self, "_values", store)

        def __getattr__(self, name):
            values = object.__getattribute__(self, "_values")
            if name in values:
                return values[name]
            if name in ("AddObserver", "RemoveObserver", "HasObserver", "Modified",
                        "StartModify", "EndModify"):  # forwarded to the node, as Slicer does
                return getattr(object.__getattribute__(self, "parameterNode"), name)
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in self._values:
                raise AttributeError(f"no parameter {name!r}")
            self._values[name] = value
            self.parameterNode.Modified()

        def connectGui(self, ui):
            bound = [w for w in vars(ui).values() if getattr(w, "parameterName", "")]
            for w in bound:
                w.bound = self
                if w.parameterName == "inputVolume":
                    w.current = self.inputVolume
            return bound

        def disconnectGui(self, tag):
            for w in tag or []:
                w.bound = None

    Wrapped.__name__ = cls.__name__
    return Wrapped


class Parent:
    def __init__(self):
        self.title, self.categories, self.contributors = "", [], []
        self.helpText = self.acknowledgementText = ""
        self.dependencies: list = []
        self.isEntered = False


class Layout:
    def addWidget(self, widget) -> None:
        self.widget = widget


def install(scene, monkeypatch, testing: bool = True):
    """Put the stand-ins in place (undone by ``monkeypatch``) and import ``CMBDetector.py``."""
    import slicer
    import slicer.util

    recorded = types.SimpleNamespace(errors=[], confirms=[], translations=[], app_slots=[],
                                     pip_calls=[], widget=None)

    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QAbstractItemView = types.SimpleNamespace(SelectRows=1, NoEditTriggers=0)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text

    def translate(context, text):
        recorded.translations.append((context, text))
        return text
    i18n.translate = translate
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = parameter_node_wrapper
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or Parent()
            self.layout = Layout()

        def setup(self):
            pass

        def resourcePath(self, rel):
            return str(MODULE_DIR / "Resources" / rel)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            node = scene.GetSingletonNode("CMBDetector", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("CMBDetector")
                node.SetModuleName("CMBDetector")
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    for name, mod in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", pnw),
                      ("slicer.ScriptedLoadableModule", slm)):
        monkeypatch.setitem(sys.modules, name, mod)

    widgets: dict = {}

    def loadUI(path):
        widgets.clear()
        widgets.update(ui_widgets())
        return widgets["CMBDetector"]

    def widget_representation():
        return types.SimpleNamespace(self=lambda: recorded.widget)

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # what Slicer shows in a message box
            recorded.errors.append(f"{message} {exc}")

    def select_module(name):
        assert name == "CMBDetector"
        w = recorded.widget
        if not w.parent.isEntered:
            w.parent.isEntered = True
            w.enter()

    app = types.SimpleNamespace(connect=lambda sig, slot: recorded.app_slots.append(sig),
                                testingEnabled=lambda: testing)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        cmbdetector=types.SimpleNamespace(widgetRepresentation=widget_representation),
        markups=types.SimpleNamespace(logic=lambda: types.SimpleNamespace(
            JumpSlicesToNthPointInMarkup=lambda *a: None))), raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget",
                        types.SimpleNamespace(ForcePlaceSingleMarkup=2), raising=False)
    for name, value in (("loadUI", loadUI),
                        ("childWidgetVariables",
                         lambda root: types.SimpleNamespace(**widgets)),
                        ("confirmOkCancelDisplay",
                         lambda text, **kw: recorded.confirms.append(text) or False),
                        ("errorDisplay", lambda text, **kw: recorded.errors.append(text)),
                        ("pip_install", lambda *a, **kw: recorded.pip_calls.append(a)),
                        ("tryWithErrorDisplay", try_with_error_display),
                        ("selectModule", select_module)):
        monkeypatch.setattr(slicer.util, name, value, raising=False)

    spec = importlib.util.spec_from_file_location("CMBDetector", MODULE_DIR / "CMBDetector.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "CMBDetector", module)
    spec.loader.exec_module(module)
    return module, recorded


def make_widget(module, recorded):
    """Create, set up and enter the widget, as Slicer does when the user opens the module."""
    parent = Parent()
    widget = module.CMBDetectorWidget(parent)
    recorded.widget = widget
    widget.setup()
    parent.isEntered = True
    widget.enter()
    return widget


def pump(widget, limit_s: float = 120.0) -> None:
    """Fire the poll timer until nothing is pending (what Qt's event loop does)."""
    import time

    t0 = time.monotonic()
    while widget._timer.active:
        assert time.monotonic() - t0 < limit_s, "the panel kept polling"
        widget._timer.fire()
        time.sleep(0.02)
