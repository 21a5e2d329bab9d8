"""The ``cmbdetector`` command line (``main``): ``detect`` (``detect``) and ``bench`` (``bench``)
live here; the other subcommands live with their packages. Not packaged in Slicer."""
from __future__ import annotations

from .main import main  # noqa: F401 (the console script's entry point)
