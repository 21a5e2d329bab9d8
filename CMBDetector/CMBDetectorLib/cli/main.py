"""``cmbdetector`` command line: one subcommand per engine stage.

Each subcommand lives in the module that does the work; that module provides
``configure_parser(parser)`` and ``run_command(args) -> int``. Modules are imported only when
their subcommand runs, so ``cmbdetector --help`` stays fast and torch is loaded only when needed.
User errors (:class:`CMBError`) become one line on stderr and a non-zero exit; tracebacks only
with ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import CMBError

#: subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "detect": ("cli.detect", "detect microbleeds in one or more scans"),
    "synth": ("simulation.cli", "simulate subjects with microbleeds and mimics"),
    "train": ("training.train", "train the detector, teacher and distilled student"),
    "finetune": ("training.finetune", "fine-tune the bundled models on your own annotated scans"),
    "evaluate": ("evaluation.evaluate", "score predictions against ground truth"),
    "invariance": ("evaluation.invariance",
                   "check that lesions survive intensity, bias-field and noise changes"),
    "batch": ("cohort.batch", "process a cohort on a Dask cluster"),
    "bench": ("cli.bench", "measure speed and memory on this machine"),
}


def _module(name: str):
    return importlib.import_module(f"{__package__.rpartition('.')[0]}.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmbdetector", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cmbdetector {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.set_defaults(_module=mod)
        if only in (None, name):
            try:
                _module(mod).configure_parser(p)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.endswith(mod):
                    p.set_defaults(_missing=True)
                else:
                    raise
    return parser


def _threads_from_environment() -> None:
    """``OMP_NUM_THREADS`` also limits SimpleITK (registration) in this command's process.
    Process-wide, so only entry points that own their process do it, never the library."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    if n.isdigit() and int(n) > 0:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(only=command or "")
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "_missing", False):
        print(f"cmbdetector: error: '{args.command}' is not available in this build",
              file=sys.stderr)
        return 2
    _threads_from_environment()
    try:
        return int(_module(args._module).run_command(args) or 0)
    except CMBError as exc:
        if args.debug:
            raise
        print(f"cmbdetector: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cmbdetector: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
