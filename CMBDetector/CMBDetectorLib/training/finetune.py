"""``cmbdetector finetune``: adapt the bundled models to a group's own annotated scans.

Input: a folder of scans of one modality, each ``<name>.nii.gz`` with its CMB label mask
``<name>_cmb.nii.gz`` (any non-zero voxel is a CMB; connected components are lesions) and
optionally a brain mask ``<name>_brainmask.nii.gz``. Scans are split by scan into training and
validation (the last ``--val-fraction``); the detector and then the student are fine-tuned from
the bundled weights at a low learning rate; the operating point is chosen on the validation
scans; the result is written as a new weights folder with its own manifest, used with
``cmbdetector detect --models DIR``. The teacher is not shipped, so the student is fine-tuned
with cross-entropy only (no distillation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .. import MODALITIES
from ..errors import InputError
from ..engine.volume import read_volume, stem

LABEL_SUFFIX = "_cmb"
MASK_SUFFIX = "_brainmask"
SCAN_EXT = (".nii.gz", ".nii", ".nrrd", ".mha")


def find_pairs(folder) -> list:
    """``(scan, labels, mask-or-None)`` for every scan that has a label mask."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = {stem(p): p for p in folder.iterdir() if p.name.lower().endswith(SCAN_EXT)}
    pairs = []
    for name, path in sorted(files.items()):
        if name.endswith((LABEL_SUFFIX, MASK_SUFFIX)):
            continue
        lab = files.get(name + LABEL_SUFFIX)
        if lab is not None:
            pairs.append((path, lab, files.get(name + MASK_SUFFIX)))
    if len(pairs) < 2:
        raise InputError(f"{folder}: need at least 2 scans with <name>{LABEL_SUFFIX} label masks "
                         f"(found {len(pairs)})")
    return pairs


def truth_from_mask(labels) -> tuple:
    """Relabel a CMB mask by 26-connected components; truth list with RAS centres."""
    lab, n = ndi.label(labels.array > 0, np.ones((3, 3, 3), bool))
    if n == 0:
        return labels.with_array(lab.astype(np.uint16)), {"cmbs": [], "mimics": []}
    cms = np.array(ndi.center_of_mass(lab > 0, lab, np.arange(1, n + 1))).reshape(-1, 3)
    ras = labels.ijk_to_ras_points(cms[:, ::-1])
    return (labels.with_array(lab.astype(np.uint16)),
            {"cmbs": [{"id": i + 1, "centre_ras": ras[i].tolist()} for i in range(n)],
             "mimics": []})


def _read_cases(pairs: list, modality: str, base) -> list:
    """Every annotated scan as a training case; a label mask on another grid is refused."""
    from .data import make_case

    cases = []
    for scan, lab, mask in pairs:
        vol = read_volume(scan)
        labels, truth = truth_from_mask(read_volume(lab))
        if not labels.same_grid(vol, tol=1e-2):
            raise InputError(f"{lab}: label mask is on another grid than {scan}")
        cases.append(make_case(stem(scan), vol, modality, labels, None, truth, base,
                               read_volume(mask) if mask else None))
    return cases


def _tune_detector(det, train: list, rng, steps: int, ckpt: Path, lr: float, seed: int,
                   batch: int, patch: int, radii_mm=(1.0, 2.0, 3.0)) -> None:
    """Fine-tune the detector on balanced lesion/background patches of the training scans."""
    from .train import TrainConfig, detector_batch, dice_ce_loss, fit
    from .data import detector_patches

    # the bundled detector's sampling and loss settings, its FRST radii
    cfg = TrainConfig(frst_radii_mm=tuple(radii_mm))
    bank = [detector_patches(c, rng, size=patch + 8, **cfg.detector_sampling()) for c in train]
    img = np.concatenate([b[0] for b in bank])
    lab = np.concatenate([b[1] for b in bank])
    kind = np.concatenate([b[2] for b in bank])
    pos, neg = np.flatnonzero(kind == 1), np.flatnonzero(kind == 0)
    if len(pos) == 0:
        raise InputError("the training scans hold no CMB")

    def det_batches(r):
        idx = np.concatenate([r.choice(pos, batch // 2), r.choice(neg, batch - batch // 2)])
        return detector_batch(img, lab, idx, r, patch, cfg)

    fit(det, det_batches, steps, ckpt, lr, 50, "finetune detector",
        lambda m, b: dice_ce_loss(m(b[0]), b[1], size_weight=b[2]), seed + 1)


def _tune_student(stu, det, train: list, rng, steps: int, ckpt: Path, lr: float,
                  seed: int) -> None:
    """Fine-tune the student on the tuned detector's candidates (+ every true lesion); it is
    left as it is when there is no false candidate to learn from."""
    import torch

    from ..engine.settings import DetectionSettings
    from .train import augment_patch, fit
    from .data import candidate_table, discriminator_patches

    low = DetectionSettings(candidate_threshold=0.1)
    tabs = [candidate_table(c, det, low) for c in train]
    parts = [discriminator_patches(c, t, rng) for c, t in zip(train, tabs)]
    x = np.concatenate([p[0] for p in parts])
    seg = np.concatenate([p[1] for p in parts])
    cls = np.concatenate([p[2] for p in parts]).astype(np.int64)
    cpos, cneg = np.flatnonzero(cls == 1), np.flatnonzero(cls == 0)
    if len(cneg):
        def disc_batches(r):
            idx = np.concatenate([r.choice(cpos, 8), r.choice(cneg, 8)])
            xb, _ = zip(*(augment_patch(x[i], seg[i], r) for i in idx))
            return torch.from_numpy(np.stack(xb)), torch.from_numpy(cls[idx])

        fit(stu, disc_batches, steps, ckpt, lr, 50, "finetune student",
            lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), seed + 2)


def _validate(val: list, det, stu, base, modality: str) -> dict:
    """Candidates kept at the old threshold on the validation scans, recorded in the manifest."""
    from ..engine.inference import score_candidates
    from .data import candidate_table

    tp = fp = n_true = 0
    for c in val:
        t = candidate_table(c, det, base)
        p = score_candidates(stu, np.stack([c.image, c.frst]), t["centres"])
        keep = p >= base.threshold_for(modality)
        tp += int((keep & t["is_cmb"]).sum())
        fp += int((keep & ~t["is_cmb"]).sum())
        n_true += len(c.truth_centres)
    return {"validation_scans": len(val), "true_cmbs": n_true, "tp_candidates_kept": tp,
            "fp_per_scan": fp / max(1, len(val))}


def finetune(folder, modality: str, out_dir, models_dir=None, steps: int = 300,
             disc_steps: int = 300, lr: float = 2e-4, val_fraction: float = 0.2,
             seed: int = 0, batch: int = 4, patch: int = 48) -> Path:
    """Fine-tune detector and student on annotated scans; returns the new manifest path."""
    import shutil

    import torch

    from ..engine.models import MODELS_DIR, load_bundle, write_manifest
    from ..engine.settings import DetectionSettings

    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}")
    pairs = find_pairs(folder)
    n_val = max(1, int(round(len(pairs) * val_fraction)))
    bundle = load_bundle(models_dir or MODELS_DIR, device="cpu", optimise=False)
    base = DetectionSettings.from_dict(dict(bundle.settings)) if bundle.settings else \
        DetectionSettings()
    cases = _read_cases(pairs, modality, base)
    train, val = cases[:-n_val], cases[-n_val:]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    ck = out_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)

    det, stu = bundle.detector, bundle.student
    _tune_detector(det, train, rng, steps, ck / "detector.ckpt", lr, seed, batch, patch,
                   base.frst_radii_mm)
    _tune_student(stu, det, train, rng, disc_steps, ck / "student.ckpt", lr, seed)
    metrics = _validate(val, det, stu, base, modality)

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(det.state_dict(), out_dir / "detector.pt")
    torch.save(stu.state_dict(), out_dir / "student.pt")
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["version"] = f"{bundle.version}+finetuned"
    manifest["finetune"] = {"data": str(folder), "modality": modality, "scans": len(pairs),
                            "steps": steps, "disc_steps": disc_steps, "lr": lr, "seed": seed,
                            "validation": metrics}
    shutil.rmtree(ck, ignore_errors=True)
    return write_manifest(out_dir, manifest)


def configure_parser(p) -> None:
    p.add_argument("data", type=Path, help="folder of <name>.nii.gz + <name>_cmb.nii.gz")
    p.add_argument("--modality", required=True, choices=MODALITIES)
    p.add_argument("--output-dir", required=True, type=Path, help="new weights folder")
    p.add_argument("--models", type=Path, help="starting weights (default: bundled)")
    p.add_argument("--steps", type=int, default=300, help="detector steps")
    p.add_argument("--disc-steps", type=int, default=300, help="student steps")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)


def run_command(args) -> int:
    path = finetune(args.data, args.modality, args.output_dir, args.models, args.steps,
                    args.disc_steps, args.lr, seed=args.seed)
    print(f"fine-tuned weights: {path.parent} (use: cmbdetector detect ... --models "
          f"{path.parent})")
    return 0
