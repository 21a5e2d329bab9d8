"""Research tooling, not packaged in Slicer: metric functions (``metrics``), scoring detections
against ground truth (``evaluate``: ``cmbdetector evaluate``) and the generated
docs/VALIDATION.md (``validation_doc``). ``CMBDetectorLib.evaluation.<name>`` still reaches
``evaluate``."""
from __future__ import annotations


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "evaluate":
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.evaluate"), name)
