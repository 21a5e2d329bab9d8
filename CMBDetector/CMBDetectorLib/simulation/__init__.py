"""Research tooling, not packaged in Slicer: simulated subjects with microbleeds and mimics
(``simulator``: a pipeline of stages; ``anatomy``: the template brain; ``cli``: ``cmbdetector
synth``). ``CMBDetectorLib.simulation.<name>`` still reaches ``simulator``."""
from __future__ import annotations


def __getattr__(name):
    import importlib

    if name.startswith("__") or name == "simulator":
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.simulator"), name)
