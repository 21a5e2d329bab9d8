"""Research tooling, not packaged in Slicer: processing a whole cohort on a Dask cluster
(``batch``: ``cmbdetector batch``). ``CMBDetectorLib.cohort.<name>`` still reaches ``batch``."""
from __future__ import annotations


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "batch":
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.batch"), name)
