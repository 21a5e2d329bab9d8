"""Research tooling, not packaged in Slicer: training the detector, teacher and student
(``train``: ``cmbdetector train``), the training cases and patch banks (``data``) and
fine-tuning on annotated scans (``finetune``). ``CMBDetectorLib.training.<name>`` still reaches
``train``."""
from __future__ import annotations


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "train":
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.train"), name)
