"""Where the microbleeds are: registration to MNI152 and MARS categories, atlas region and side
(``locate``), and the one-page HTML report (``report``). Runs inside Slicer (registration in the
worker process), on the command line and in cohorts.

``CMBDetectorLib.location.<name>`` still reaches ``locate``'s functions (the module's old path).
"""
from __future__ import annotations


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "locate":
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.locate"), name)
