"""Exceptions shared by the engine, the command line and the Slicer module."""
from __future__ import annotations


class CMBError(Exception):
    """A problem the user can fix (bad input, missing weights, ...).

    The command line prints ``str(error)`` as one line and exits non-zero; the Slicer module shows
    it in a message box. Never raised for programming errors.
    """


class InputError(CMBError):
    """The scan, mask or an argument is unusable."""


class ModelError(CMBError):
    """Bundled weights are missing, altered or incompatible."""


class Cancelled(CMBError):
    """The caller's cancel callback asked to stop."""


class DependencyError(CMBError):
    """A Python package the module needs is missing and could not be installed."""
