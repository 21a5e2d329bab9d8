"""CMBDetector engine: cerebral microbleed detection on SWI, T2*-GRE or QSM.

A plain Python package (numpy, scipy, SimpleITK; torch imported lazily) that never imports Qt, so
the command line, the Slicer module and cohort processing all share it.
"""
from __future__ import annotations

__version__ = "0.1.0"

MODALITIES = ("swi", "gre", "qsm")
