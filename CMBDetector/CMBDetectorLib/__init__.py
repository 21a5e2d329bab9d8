"""CMBDetector: cerebral microbleed detection on SWI, T2*-GRE or QSM.

A plain Python package (numpy, scipy, SimpleITK; torch imported lazily) that never imports Qt, so
the command line, the Slicer module and cohort processing all share it. Its folders say where
each part runs:

- ``engine``: detection on one scan (runs inside Slicer's worker, the CLI and cohorts);
- ``slicer_module``: the MRML adapter, the headless logic, the panel controller and the worker
  process of the Slicer module;
- ``location``: MNI registration, lesion categories and the report (Slicer and CLI);
- ``cli``, ``cohort``, ``simulation``, ``training``, ``evaluation``: research and batch tooling,
  not packaged in the Slicer extension.

Modules that used to sit at the top (``CMBDetectorLib.detection``, ``CMBDetectorLib.logic``, ...)
can still be imported by their old names; docs/CHANGELOG.md lists where each moved.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

MODALITIES = ("swi", "gre", "qsm")

#: old module name -> where it lives now (for scripts written against the flat layout)
MOVED = {**{m: f"engine.{m}" for m in (
    "volume", "preprocessing", "radial_symmetry", "networks", "inference", "cleanup", "results",
    "settings", "models", "outputs", "detection", "progress")},
    **{m: f"slicer_module.{m}" for m in (
        "mrml", "logic", "panel", "worker", "process", "dependencies", "selftest", "standins")},
    "report": "location.report", "anatomy": "simulation.anatomy",
    "simulation_cli": "simulation.cli", "training_data": "training.data",
    "finetune": "training.finetune", "metrics": "evaluation.metrics",
    "validation_doc": "evaluation.validation_doc", "detection_cli": "cli.detect",
    "benchmark": "cli.bench"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import CMBDetectorLib.<old name>`` return the moved module itself (one module
    object under two names, so monkeypatching either affects both)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import machinery set the alias's spec; restore


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
