"""Bundled weights: the manifest, sha256 verification and safe loading.

Weights come only from ``CMBDetector/Resources/Models/`` (or a folder the caller names, e.g. a
fine-tuned set). ``manifest.json`` lists every file with its sha256, architecture and training
provenance; a missing or altered file is refused with its name. Loading uses
``torch.load(weights_only=True)``, which never executes pickled code. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
MANIFEST = "manifest.json"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelBundle:
    """The loaded detector and student, with the manifest that describes them."""

    detector: object
    student: object
    manifest: dict
    device: object = None
    directory: Path | None = None
    settings: dict = field(default_factory=dict)
    #: why the networks are not where they were asked to be (e.g. unusable CUDA -> CPU)
    notes: list = field(default_factory=list)

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "unknown"))


def read_manifest(directory=None) -> dict:
    directory = Path(directory or MODELS_DIR)
    path = directory / MANIFEST
    if not path.exists():
        raise ModelError(f"no trained weights: {path} is missing (run `cmbdetector train` or "
                         "reinstall the extension); the engine refuses to run untrained")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: manifest is not valid JSON ({exc.msg})") from None


def default_threshold(modality: str, manifest: dict) -> float:
    """The student threshold the models were validated at for ``modality`` (the manifest's
    per-modality threshold, else its shared one)."""
    inference = manifest.get("inference", {})
    per_modality = inference.get("modality_thresholds") or {}
    return float(per_modality.get(modality, inference.get("threshold", 0.5)))


def verify(directory=None) -> dict:
    """Check every weights file against the manifest's sha256; return the manifest."""
    directory = Path(directory or MODELS_DIR)
    manifest = read_manifest(directory)
    for role in ("detector", "student"):
        entry = manifest.get("models", {}).get(role)
        if not entry:
            raise ModelError(f"{directory / MANIFEST}: no '{role}' entry")
        f = directory / entry["file"]
        if not f.exists():
            raise ModelError(f"weights file missing: {f}")
        digest = sha256(f)
        if digest != entry["sha256"]:
            raise ModelError(f"weights file altered: {f} (sha256 {digest[:12]}... does not "
                             f"match the manifest's {entry['sha256'][:12]}...)")
    return manifest


def cuda_problem() -> str:
    """Why CUDA cannot run this engine here ("" when it can).

    ``is_available()`` is not enough: a torch build without kernels for the card, or a card
    whose memory is taken, only fails when a kernel runs, so a tiny one is run here."""
    import torch

    if not (torch.backends.cuda.is_built() and torch.cuda.is_available()):
        return "no CUDA device is available"
    try:
        x = torch.ones(64, device="cuda")
        torch.nn.functional.conv3d(x.view(1, 1, 4, 4, 4), torch.ones(1, 1, 3, 3, 3,
                                                                      device="cuda")).sum().item()
    except Exception as exc:  # RuntimeError (no kernel image), torch.cuda.OutOfMemoryError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"CUDA is present but unusable ({first})"
    return ""


def disable_tf32() -> None:
    """Full float32 on CUDA: TF32 convolutions and matmuls (on by default for cuDNN on Ampere
    and newer) round to 10 mantissa bits, enough to move a confidence across the threshold, and
    CPU and GPU must give the same lesions. The networks are small; the cost is negligible."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def select_device(preference: str = "auto", notes: list | None = None):
    """``auto``: CUDA when it works, else the CPU (with a warning, also appended to ``notes``,
    when a GPU is present but unusable); ``cuda`` fails clearly when it does not work."""
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    problem = cuda_problem()
    if preference == "cuda" and problem:
        raise ModelError(f"device 'cuda' requested but {problem} (use --device auto or cpu)")
    if problem and problem != "no CUDA device is available":
        message = f"{problem}; running on the CPU"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if notes is not None:
            notes.append(message)
    if problem:
        return torch.device("cpu")
    disable_tf32()
    return torch.device("cuda")


def load_network(directory: Path, entry: dict, device, optimise: bool = True):
    """One network of the bundle on ``device``, prepared for inference
    (:func:`~CMBDetectorLib.engine.networks.for_inference`) unless ``optimise`` is False
    (fine-tuning trains the loaded networks)."""
    import torch

    from .networks import build, for_inference

    net = build(entry["architecture"], entry["config"])
    try:
        state = torch.load(directory / entry["file"], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # corrupt file, wrong architecture
        raise ModelError(f"cannot load {directory / entry['file']}: {exc}".splitlines()[0]) \
            from None
    net = net.to(device).eval()
    return for_inference(net) if optimise else net


def load_bundle(directory=None, device: str = "auto", optimise: bool = True) -> ModelBundle:
    """Verify and load the detector and the student (``optimise``: see
    :func:`load_network`)."""
    directory = Path(directory or MODELS_DIR)
    manifest = verify(directory)
    notes: list = []
    dev = select_device(device, notes)
    entries = manifest["models"]
    try:
        nets = [load_network(directory, entries[k], dev, optimise)
                for k in ("detector", "student")]
    except RuntimeError as exc:  # e.g. CUDA out of memory while moving the weights
        if dev.type != "cuda" or device == "cuda":
            raise
        import torch

        message = f"CUDA failed while loading the models ({str(exc).splitlines()[0]}); " \
                  "running on the CPU"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        notes.append(message)
        dev = torch.device("cpu")
        nets = [load_network(directory, entries[k], dev, optimise)
                for k in ("detector", "student")]
    return ModelBundle(nets[0], nets[1], manifest, dev, directory, manifest.get("inference", {}),
                       notes)


def write_manifest(directory, manifest: dict) -> Path:
    """Fill in sha256 and sizes of every listed file and write ``manifest.json``."""
    directory = Path(directory)
    for entry in manifest.get("models", {}).values():
        f = directory / entry["file"]
        entry["sha256"] = sha256(f)
        entry["bytes"] = f.stat().st_size
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
