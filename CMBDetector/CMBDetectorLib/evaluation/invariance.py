"""``cmbdetector invariance``: do a model's lesions survive another scanner's intensity curve?

A scan and the same scan after a monotone intensity change (gamma 0.7 and 1.4), another bias
field or more noise should give the same lesions. One subject is a noisy gate: on one MNI152
subject v21 kept every lesion with 12 CMBs and lost 4 of 11 QSM lesions under gamma 0.7 with
16 (2026-12-05). So the gate pools several subjects per modality and change and counts the
lesions lost plus gained against the lesions of the unchanged scans.

Subjects are simulated from the ``validation`` split's seeds and domains (never a training or
test split: this chooses models), cropped to a 96 mm box so one subject takes seconds; pick
seeds no run used (``--start``; training runs validate on subjects 0-7 and 100-107).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import MODALITIES
from ..errors import InputError

#: A lesion counts as the same when its centroid moved less than this (mm).
MATCH_MM = 2.0
#: A changed lesion counts as a true CMB within this of a CMB's centre (or its visible radius).
CMB_MATCH_MM = 3.0
#: The gate: lesions lost + gained at most this fraction of the unchanged scans' lesions,
#: per modality and change, pooled over subjects.
MAX_CHANGED_FRACTION = 0.25
#: Confidence shifts are measured on the unchanged scan's kept candidates at least this
#: confident (below it a candidate is background either way).
SHIFT_FLOOR = 0.3


def gamma_change(vol, gamma: float):
    """Monotone gamma on the scan's own range (QSM's sign kept through the shift); a QSM's
    zero outside its reconstruction mask stays zero, as a pipeline writes it."""
    a = vol.array.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    out = (lo + (hi - lo) * ((a - lo) / (hi - lo)) ** gamma).astype(np.float32)
    if lo < 0:
        out[a == 0] = 0.0
    return vol.with_array(out)


def bias_change(vol, strength: float = 0.25):
    """Multiply by a smooth field: +-``strength`` along a diagonal of the field of view."""
    a = vol.array.astype(np.float32)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in a.shape), indexing="ij")
    field = np.exp(strength * (i + j + k) / 3.0).astype(np.float32)
    if a.min() < 0:  # QSM: a smooth background-field residue inside its mask, not a gain
        return vol.with_array(np.where(a != 0, a + 0.02 * (i + j + k).astype(np.float32) / 3.0,
                                       0.0).astype(np.float32))
    return vol.with_array(a * field)


def noise_change(vol, fraction: float = 0.03, seed: int = 7):
    """Rician noise of ``fraction`` x the median magnitude (Gaussian for QSM)."""
    a = vol.array.astype(np.float32)
    rng = np.random.default_rng(seed)
    sigma = fraction * float(np.median(np.abs(a[a != 0])))
    if a.min() < 0:
        return vol.with_array(np.where(a != 0, a + rng.normal(0, sigma, a.shape), 0.0)
                              .astype(np.float32))
    n1, n2 = (rng.normal(0, sigma, a.shape).astype(np.float32) for _ in range(2))
    return vol.with_array(np.sqrt((a + n1) ** 2 + n2 ** 2))


CHANGES = {"gamma 0.7": lambda v: gamma_change(v, 0.7), "gamma 1.4": lambda v: gamma_change(v, 1.4),
           "bias field": bias_change, "more noise": noise_change}


def _nearest(a: list, b: list):
    """For each item of ``a``: the index of the nearest item of ``b`` (by centroid) and its
    distance in mm; both lists non-empty."""
    pa = np.array([x.centroid_ras for x in a])
    pb = np.array([x.centroid_ras for x in b])
    d = np.linalg.norm(pa[:, None] - pb[None], axis=2)
    return d.argmin(1), d.min(1)


def unmatched_lesions(a: list, b: list, match_mm: float = MATCH_MM) -> list:
    """The lesions of ``a`` with no lesion of ``b`` within ``match_mm``."""
    if not a or not b:
        return list(a)
    _, dist = _nearest(a, b)
    return [x for x, far in zip(a, dist > match_mm) if far]


def unmatched(a: list, b: list, match_mm: float = MATCH_MM) -> int:
    """How many lesions of ``a`` have no lesion of ``b`` within ``match_mm``."""
    return len(unmatched_lesions(a, b, match_mm))


def confidence_shifts(ref: list, got: list, floor: float = SHIFT_FLOOR,
                      match_mm: float = MATCH_MM) -> list:
    """``|confidence change|`` of each ``ref`` candidate with confidence >= ``floor`` that has a
    ``got`` candidate within ``match_mm`` (the nearest): unlike lost and gained, it does not
    depend on where the threshold lies, so it tells a student that moves with the intensity
    curve from one whose lesions merely sit near its threshold."""
    ref = [x for x in ref if x.confidence >= floor]
    if not ref or not got:
        return []
    near, dist = _nearest(ref, got)
    return [round(abs(float(got[j].confidence) - float(x.confidence)), 4)
            for x, j, dj in zip(ref, near, dist) if dj <= match_mm]


def true_cmbs(lesions: list, cmbs: list, modality: str) -> int:
    """How many ``lesions`` lie on a simulated CMB: centroid within the CMB's visible radius
    (on SWI its SWI footprint's) or ``CMB_MATCH_MM`` of its centre, whichever is larger."""
    if not lesions or not cmbs:
        return 0
    key = "swi_visible_diameter_mm" if modality == "swi" else "visible_diameter_mm"
    centres = np.array([c["centre_ras"] for c in cmbs], float)
    reach = np.array([max(CMB_MATCH_MM, 0.5 * float(c.get(key) or c.get("visible_diameter_mm")
                                                     or 0.0)) for c in cmbs])
    pts = np.array([x.centroid_ras for x in lesions], float)
    d = np.linalg.norm(pts[:, None] - centres[None], axis=2)
    return int((d <= reach[None]).any(1).sum())


def change_details(volume, modality: str, bundle, settings=None, cmbs=None) -> dict:
    """For each change: ``lesions`` of the original, ``lost``, ``gained``; with the simulated
    ``cmbs`` (truth records) also how many of the lost and gained lesions are true CMBs
    (``lost_cmbs``, ``gained_cmbs``): gaining CMBs under a change says the model is limited by
    contrast there, losing them or gaining others that it is unstable. ``shifts``: the
    confidence changes of the kept candidates (``confidence_shifts``)."""
    from ..engine.detection import default_settings, detect

    settings = settings or default_settings(bundle, device="cpu")
    first = detect(volume, modality, None, settings, bundle)
    ref, ref_all = first.lesions(), first.lesions(0.0)
    out = {}
    for name, change in CHANGES.items():
        result = detect(change(volume), modality, None, settings, bundle)
        got = result.lesions()
        lost, gained = unmatched_lesions(ref, got), unmatched_lesions(got, ref)
        out[name] = {"lesions": len(ref), "lost": len(lost), "gained": len(gained),
                     "shifts": confidence_shifts(ref_all, result.lesions(0.0))}
        if cmbs is not None:
            out[name].update(lost_cmbs=true_cmbs(lost, cmbs, modality),
                             gained_cmbs=true_cmbs(gained, cmbs, modality))
    return out


def lesion_changes(volume, modality: str, bundle, settings=None) -> dict:
    """For each change: ``(lesions of the original, lost, gained)``."""
    return {name: (c["lesions"], c["lost"], c["gained"])
            for name, c in change_details(volume, modality, bundle, settings).items()}


def gate(rows: list, max_fraction: float = MAX_CHANGED_FRACTION) -> dict:
    """Pool per-subject rows ``{modality, change, lesions, lost, gained}`` per modality and
    change; each pooled cell passes when lost + gained <= ``max_fraction`` x lesions (at least
    one change allowed, so a single flicker on few lesions is not a failure). Rows with
    ``shifts`` also give each cell the 90th percentile of the pooled confidence changes
    (``shift_p90``; reported, not part of the verdict)."""
    cells: dict = {}
    shifts: dict = {}
    for r in rows:
        key = (r["modality"], r["change"])
        c = cells.setdefault(key, {"lesions": 0, "lost": 0, "gained": 0, "subjects": 0})
        for k in ("lesions", "lost", "gained", "lost_cmbs", "gained_cmbs"):
            if k in r:
                c[k] = c.get(k, 0) + int(r[k])
        c["subjects"] += 1
        if "shifts" in r:
            shifts.setdefault(key, []).extend(r["shifts"])
    for key, values in shifts.items():
        cells[key]["shift_p90"] = (round(float(np.percentile(values, 90)), 3) if values
                                   else None)
    table = []
    for (mod, change), c in sorted(cells.items()):
        changed = c["lost"] + c["gained"]
        allowed = max(1, int(np.floor(max_fraction * c["lesions"])))
        table.append({"modality": mod, "change": change, **c,
                      "changed_fraction": round(changed / c["lesions"], 3) if c["lesions"]
                      else None, "passed": bool(c["lesions"] > 0 and changed <= allowed)})
    return {"cells": table, "passed": bool(table) and all(c["passed"] for c in table),
            "max_changed_fraction": max_fraction, "match_mm": MATCH_MM}


def simulate(seed: int, split: str | None, n_cmbs: int, roi_mm: float = 96.0):
    """One small subject: the split's domain for ``seed`` (None: MNI152, simulator defaults)."""
    from ..simulation.domains import domain_config
    from ..simulation.simulator import SimulationConfig, simulate_subject

    base = SimulationConfig(roi_mm=roi_mm, n_cmbs=n_cmbs, cmb_size_prior="real")
    config = base if split is None else domain_config(seed, split, base)
    return simulate_subject(seed, config)


def measure(bundle, seeds: list, split: str | None = "validation", n_cmbs: int = 12,
            modalities=MODALITIES, progress=None) -> list:
    """Per subject, modality and change: one row of lesion counts."""
    rows = []
    for n, seed in enumerate(seeds):
        subject = simulate(seed, split, n_cmbs)
        cmbs = subject.truth.get("cmbs", [])
        for mod in modalities:
            for change, counts in change_details(subject.images[mod], mod, bundle,
                                                 cmbs=cmbs).items():
                rows.append({"seed": int(seed), "modality": mod, "change": change, **counts})
            if progress is not None:
                progress(n, mod)
    return rows


def format_table(result: dict) -> str:
    """The gate as a table; with truth, lost and gained read "all (true CMBs)"."""
    def count(c, k):
        return f"{c[k]} ({c[k + '_cmbs']})" if k + "_cmbs" in c else str(c[k])

    with_shift = any("shift_p90" in c for c in result["cells"])

    def shift(c):  # the optional column, with its leading space
        if not with_shift:
            return ""
        return f" {'' if c.get('shift_p90') is None else format(c['shift_p90'], '.3f'):>10}"

    lines = [f"{'modality':8} {'change':11} {'lesions':>7} {'lost':>7} {'gained':>7}"
             + (f" {'conf. p90':>10}" if with_shift else "") + "  verdict"]
    for c in result["cells"]:
        lines.append(f"{c['modality']:8} {c['change']:11} {c['lesions']:7d} "
                     f"{count(c, 'lost'):>7} {count(c, 'gained'):>7}{shift(c)}"
                     f"  {'ok' if c['passed'] else 'FAIL'}")
    if any("lost_cmbs" in c for c in result["cells"]):
        lines.append("lost / gained: all (of them true CMBs)")
    if with_shift:
        lines.append(f"conf. p90: 90th percentile of |confidence change| of the kept "
                     f"candidates >= {SHIFT_FLOOR} (not part of the verdict)")
    lines.append("PASS" if result["passed"] else "FAIL")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------
def configure_parser(p) -> None:
    p.add_argument("--models", default=None, help="weights folder (default: bundled)")
    p.add_argument("--subjects", type=int, default=4, help="simulated subjects (default 4)")
    p.add_argument("--start", type=int, default=0, help="first subject of the split")
    p.add_argument("--mni152", action="store_true",
                   help="the MNI152 template with the simulator's defaults instead of the "
                        "validation split's domains (needs no installed anatomy)")
    p.add_argument("--n-cmbs", type=int, default=12, help="CMBs per subject (default 12)")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--output", default=None, help="write rows and the gate as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run_command(args) -> int:
    """Exit 0 when the gate passes, 3 when it fails (1: bad input)."""
    from ..engine.models import load_bundle

    mods = [m.strip().lower() for m in args.modalities.split(",") if m.strip()]
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods:
        raise InputError(f"unknown modality {', '.join(bad) or '(none)'}; use "
                         f"{', '.join(MODALITIES)}")
    if args.subjects < 1 or args.n_cmbs < 1:
        raise InputError("--subjects and --n-cmbs must be at least 1")
    split = None if args.mni152 else "validation"
    from ..simulation.domains import missing_anatomies, split_seeds

    missing = missing_anatomies() if split else []
    if missing:  # each seed would draw another subject than where all are installed
        raise InputError(f"invariance: anatomies not installed here: {', '.join(missing)} "
                         "(run `make anatomies`, or --mni152)")

    seeds = split_seeds("validation", args.subjects, args.start)
    bundle = load_bundle(args.models, device="cpu")

    def progress(n, mod):
        if not args.quiet:
            print(f"\r[{n + 1}/{len(seeds)}] subject {seeds[n]} {mod}   ", end="",
                  file=sys.stderr, flush=True)

    rows = measure(bundle, seeds, split, args.n_cmbs, mods, progress)
    if not args.quiet:
        print(file=sys.stderr)
    result = gate(rows)
    result.update({"rows": rows, "models": str(args.models or "bundled"),
                   "model_version": getattr(bundle, "version", ""), "split": "validation",
                   "domains": "mni152" if args.mni152 else "validation", "n_cmbs": args.n_cmbs})
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 3
