"""Bundled weights: the manifest, sha256 verification and safe loading.

Weights come only from ``CMBDetector/Resources/Models/`` (or a folder the caller names, e.g. a
fine-tuned set). ``manifest.json`` lists every file with its sha256, architecture and training
provenance; a missing or altered file is refused with its name. Loading uses
``torch.load(weights_only=True)``, which never executes pickled code. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
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


def select_device(preference: str = "auto"):
    """``auto``: CUDA when available, else CPU; ``cuda`` fails clearly when there is none."""
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    cuda_ok = torch.backends.cuda.is_built() and torch.cuda.is_available()
    if preference == "cuda" and not cuda_ok:
        raise ModelError("device 'cuda' requested but no CUDA device is available "
                         "(use --device auto or cpu)")
    return torch.device("cuda" if cuda_ok else "cpu")


def load_network(directory: Path, entry: dict, device):
    import torch

    from .networks import build

    net = build(entry["architecture"], entry["config"])
    try:
        state = torch.load(directory / entry["file"], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # corrupt file, wrong architecture
        raise ModelError(f"cannot load {directory / entry['file']}: {exc}".splitlines()[0]) \
            from None
    return net.to(device).eval()


def load_bundle(directory=None, device: str = "auto") -> ModelBundle:
    """Verify and load the detector and the student."""
    directory = Path(directory or MODELS_DIR)
    manifest = verify(directory)
    dev = select_device(device)
    entries = manifest["models"]
    return ModelBundle(load_network(directory, entries["detector"], dev),
                       load_network(directory, entries["student"], dev), manifest, dev,
                       directory, manifest.get("inference", {}))


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
