"""CPU-vs-CUDA comparison of detection on whole-brain validation scans (for device_check.sh).

Each scan is simulated where this runs, from a validation seed's domain
(``simulation.domains``; MNI152 where the drawn anatomy is not installed, as on the GPU
machine), preprocessed and detected once with the networks on each device, and reported:
candidate and lesion counts, the largest centroid and confidence differences of matched
candidates, the largest preprocessed-image difference and wall times, against the issue's
tolerances. ``--reference`` also compares the CPU side with the result recorded on the
development machine (``reference_cpu.json``).

    PYTHONPATH=CMBDetector python Testing/device/compare_devices.py --json OUT.json \
        --reference Testing/device/reference_cpu.json
    --dry (or DEVICE_CHECK_DRY=1): both sides on the CPU, one 64 mm crop (checks this script)
    --mni152-only --write-reference Testing/device/reference_cpu.json: how the reference was made
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

CENTROID_MM = 0.1   # the same lesion: centroids this close
CONFIDENCE = 0.01   # student probabilities this close
IMAGE = 1e-4        # preprocessed images this close
MODALITY_CYCLE = ("swi", "gre", "qsm")  # scan n gets modality n % 3
DRY_CROP_MM = 64.0
INPUT_SAMPLES, IMAGE_SAMPLES = 256, 1024


@dataclass
class Side:
    """One device's run on one scan."""

    device: str
    summary: dict        # candidates [[R, A, S, confidence]], lesions [[R, A, S]]
    image: np.ndarray    # the preprocessed image the networks saw
    preprocess_s: float
    networks_s: float    # detector, student and clean-up
    device_used: str = ""


def plan(n: int) -> list:
    """``(seed, modality)`` of the first ``n`` validation subjects, modalities in turn."""
    from CMBDetectorLib.simulation.domains import split_seeds

    return [(s, MODALITY_CYCLE[i % 3]) for i, s in enumerate(split_seeds("validation", n))]


def scan_config(seed: int, installed, crop_mm=None):
    """The subject's validation domain as drawn with every anatomy installed (as in training),
    with MNI152 when the drawn anatomy is not in ``installed``; returns ``(config, note)``."""
    from CMBDetectorLib.simulation.anatomies import SOURCES
    from CMBDetectorLib.simulation.domains import domain_config

    cfg, note = domain_config(seed, "validation", anatomies=sorted(SOURCES)), ""
    if cfg.anatomy != "mni152" and cfg.anatomy not in installed:
        note = f"anatomy {cfg.anatomy} not installed (or --mni152-only): MNI152 instead, " \
               "the domain's other knobs kept"
        cfg = replace(cfg, anatomy="mni152")
    if crop_mm:
        cfg = replace(cfg, roi_mm=crop_mm)
    return cfg, note


def summarise(result) -> dict:
    """The parts of a DetectionResult that must agree across devices, JSON-ready."""
    return {"candidates": [[*map(float, c.centroid_ras), float(c.confidence)]
                           for c in result.candidates],
            "lesions": [list(map(float, les.centroid_ras)) for les in result.lesions()]}


def run_device(volume, modality: str, bundle, device: str) -> Side:
    from CMBDetectorLib.engine.detection import default_settings, detect_prepared, prepare_scan

    t0 = time.perf_counter()
    prepared = prepare_scan(volume, modality, settings=default_settings(bundle, device=device))
    t1 = time.perf_counter()
    result = detect_prepared(prepared, models=bundle)
    t2 = time.perf_counter()
    return Side(device, summarise(result), prepared.channels[0], t1 - t0, t2 - t1, result.device)


def warm_up(bundle) -> None:
    """One small pass of each network, so the first scan's time holds no CUDA start-up."""
    from CMBDetectorLib.engine.inference import predict_volume, score_candidates

    x = np.zeros((2, 48, 48, 48), np.float32)
    predict_volume(bundle.detector, x)
    score_candidates(bundle.student, x, np.array([[24.0, 24.0, 24.0]]))


def nearest(a: np.ndarray, b: np.ndarray):
    """For each point of ``a`` (N x 3 mm), the index of and distance to the nearest of ``b``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0)
    d = np.linalg.norm(a[:, None, :3] - b[None, :, :3], axis=2)
    return d.argmin(1), d.min(1)


def agreement(a: dict, b: dict) -> dict:
    """Candidates and lesions of two summaries: counts, worst centroid and confidence gaps."""
    ca = np.asarray(a["candidates"], float).reshape(-1, 4)
    cb = np.asarray(b["candidates"], float).reshape(-1, 4)
    idx, dist = nearest(ca, cb)
    conf = np.abs(ca[:, 3] - cb[idx, 3]) if len(idx) else np.zeros(0)
    la, lb = (np.asarray(s["lesions"], float).reshape(-1, 3) for s in (a, b))
    lidx, ldist = nearest(la, lb)
    same_lesions = len(la) == len(lb) and len(set(lidx)) == len(lidx) and \
        bool(np.all(ldist <= CENTROID_MM))
    out = {"candidates": [len(ca), len(cb)], "lesions": [len(la), len(lb)],
           "max_centroid_mm": float(dist.max(initial=0.0)),
           "max_confidence_diff": float(conf.max(initial=0.0)), "same_lesions": same_lesions}
    out["ok"] = len(ca) == len(cb) and len(set(idx)) == len(idx) and same_lesions and \
        out["max_centroid_mm"] <= CENTROID_MM and out["max_confidence_diff"] <= CONFIDENCE
    return out


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0))


def samples(array: np.ndarray, n: int) -> dict:
    """Shape, mean and ``n`` values at fixed positions: a fingerprint of an array."""
    flat = np.asarray(array, np.float64).ravel()
    idx = np.random.default_rng(0).integers(0, flat.size, n)
    return {"shape": list(array.shape), "mean": float(flat.mean()),
            "values": [round(float(v), 7) for v in flat[idx]]}


def sample_diff(ref: dict, array: np.ndarray) -> float:
    """Largest difference between a fingerprint and the same positions of ``array``."""
    if list(array.shape) != ref["shape"]:
        return float("inf")
    now = samples(array, len(ref["values"]))
    return max_abs_diff(np.asarray(ref["values"]), np.asarray(now["values"]))


def reference_entry(cfg, volume, side: Side) -> dict:
    return {"anatomy": cfg.anatomy, "roi_mm": cfg.roi_mm,
            "input": samples(volume.array, INPUT_SAMPLES),
            "image": samples(side.image, IMAGE_SAMPLES), **side.summary}


def against_reference(ref: dict | None, cfg, volume, side: Side) -> dict:
    """The CPU side against the development machine's recorded CPU result."""
    if ref is None:
        return {"compared": False, "why": "no reference for this scan"}
    if (ref["anatomy"], ref["roi_mm"]) != (cfg.anatomy, cfg.roi_mm):
        return {"compared": False, "why": f"reference made with anatomy {ref['anatomy']}, "
                f"roi {ref['roi_mm']}"}
    out = {"compared": True, "max_input_diff": sample_diff(ref["input"], volume.array),
           "max_image_diff": sample_diff(ref["image"], side.image), **agreement(ref, side.summary)}
    out["ok"] = out["ok"] and out["max_image_diff"] <= IMAGE
    return out


def environment() -> dict:
    import scipy
    import SimpleITK
    import torch

    from CMBDetectorLib.engine.models import read_manifest

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "numpy": np.__version__, "scipy": scipy.__version__, "torch": torch.__version__,
           "SimpleITK": SimpleITK.__version__, "torch_threads": torch.get_num_threads(),
           "cuda": torch.version.cuda, "models": read_manifest().get("version", "?"),
           "SimpleITK_from": str(Path(SimpleITK.__file__).parent.parent)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def check_scan(seed, modality, bundles, devices, installed, crop_mm, reference) -> dict:
    """Simulate one scan, detect on both devices, compare; the row of the report."""
    from CMBDetectorLib.simulation.simulator import simulate_subject

    cfg, note = scan_config(seed, installed, crop_mm)
    t0 = time.perf_counter()
    volume = simulate_subject(seed, cfg).images[modality]
    row = {"seed": seed, "modality": modality, "anatomy": cfg.anatomy, "note": note,
           "shape_kji": list(volume.array.shape),
           "spacing_mm": [round(float(s), 3) for s in volume.spacing],
           "simulate_s": round(time.perf_counter() - t0, 2)}
    sides = [run_device(volume, modality, b, d) for b, d in zip(bundles, devices)]
    if len(sides) == 2:
        cmp = agreement(sides[0].summary, sides[1].summary)
        cmp["max_image_diff"] = max_abs_diff(sides[0].image, sides[1].image)
        cmp["ok"] = cmp["ok"] and cmp["max_image_diff"] <= IMAGE
        row["cpu_vs_cuda"] = cmp
    names = [d if d not in devices[:n] else f"{d}#2" for n, d in enumerate(devices)]
    row["times_s"] = {name: {"preprocess": round(s.preprocess_s, 2),
                             "networks": round(s.networks_s, 2)}
                      for name, s in zip(names, sides)}
    row["devices"] = [s.device_used for s in sides]
    if reference is not None:
        row["vs_reference"] = against_reference(reference.get(f"{seed}:{modality}"), cfg,
                                                volume, sides[0])
    row["_reference_entry"] = reference_entry(cfg, volume, sides[0])
    return row


def format_row(r: dict) -> str:
    times = "; ".join(f"{k} {v['preprocess']}+{v['networks']} s"
                      for k, v in r["times_s"].items())
    line = (f"seed {r['seed']} {r['modality']} {r['anatomy']} {r['shape_kji']} "
            f"sim {r['simulate_s']} s | {times} (prep+networks)")
    c = r.get("cpu_vs_cuda")
    if c:
        line += (f"\n    {r['devices'][0]} vs {r['devices'][1]}: candidates "
                 f"{c['candidates'][0]}/{c['candidates'][1]}, lesions "
                 f"{c['lesions'][0]}/{c['lesions'][1]}, max dconf {c['max_confidence_diff']:.2e}, "
                 f"dcentroid {c['max_centroid_mm']:.3f} mm, dimage {c['max_image_diff']:.2e}"
                 f" -> {'SAME' if c['ok'] else 'DIFFERENT'}")
    if r.get("note"):
        line += f"\n    note: {r['note']}"
    ref = r.get("vs_reference")
    if ref:
        line += "\n    vs development-machine CPU: " + (
            f"input d {ref['max_input_diff']:.2e}, image d {ref['max_image_diff']:.2e}, "
            f"candidates {ref['candidates'][0]}/{ref['candidates'][1]}, lesions "
            f"{ref['lesions'][0]}/{ref['lesions'][1]}, max dconf "
            f"{ref['max_confidence_diff']:.2e} -> {'SAME' if ref['ok'] else 'DIFFERENT'}"
            if ref["compared"] else f"not compared ({ref['why']})")
    return line


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, help="validation subjects (default 3; dry run 1)")
    p.add_argument("--dry", action="store_true", help="both sides on the CPU, 64 mm crops")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--reference", help="compare the CPU side with this reference file")
    p.add_argument("--write-reference",
                   help="run on the CPU alone and record its results in this file")
    p.add_argument("--mni152-only", action="store_true",
                   help="MNI152 for every scan, as on a machine without the anatomy packages "
                        "(how reference_cpu.json is made)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from CMBDetectorLib.engine.models import cuda_problem, load_bundle
    from CMBDetectorLib.simulation.anatomies import available_anatomies

    args = parse(argv)
    dry = args.dry or os.environ.get("DEVICE_CHECK_DRY") == "1"
    devices = ("cpu",) if args.write_reference else ("cpu", "cpu") if dry else ("cpu", "cuda")
    if "cuda" in devices and cuda_problem():
        print(f"compare_devices: no comparison: {cuda_problem()}")
        return 2
    env = environment()
    print("environment:", json.dumps(env))
    if dry:
        print(f"DRY RUN: networks on {' and '.join(devices)}, {DRY_CROP_MM:g} mm crops")
    bundles = [load_bundle(device=d) for d in devices]
    for b in bundles:
        warm_up(b)
    installed = () if args.mni152_only else available_anatomies()
    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    rows = []
    for seed, modality in plan(args.scans or (1 if dry else 3)):
        rows.append(check_scan(seed, modality, bundles, devices, installed,
                               DRY_CROP_MM if dry else None, reference))
        print(format_row(rows[-1]), flush=True)
    entries = {f"{r['seed']}:{r['modality']}": r.pop("_reference_entry") for r in rows}
    if args.write_reference:
        Path(args.write_reference).write_text(json.dumps(entries, sort_keys=True) + "\n")
    ok = all(r.get(k, {}).get("ok", True) for r in rows for k in ("cpu_vs_cuda", "vs_reference"))
    report = {"environment": env, "dry": dry, "devices": devices, "ok": ok, "scans": rows,
              "tolerances": {"centroid_mm": CENTROID_MM, "confidence": CONFIDENCE,
                             "image": IMAGE}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(verdict(rows, args.write_reference))
    return 0 if ok else 1


def verdict(rows: list, written: str | None) -> str:
    """The last line: one verdict per comparison made."""
    if written:
        return f"reference written: {written}"
    words = {True: "the same within tolerance on every scan", False: "DIFFERENT (above)"}
    out = f"devices: {words[all(r['cpu_vs_cuda']['ok'] for r in rows)]}"
    refs = [r["vs_reference"] for r in rows if r.get("vs_reference", {}).get("compared")]
    if refs:
        out += f"; vs reference_cpu.json ({len(refs)} scans): {words[all(x['ok'] for x in refs)]}"
    return out


if __name__ == "__main__":
    sys.exit(main())
