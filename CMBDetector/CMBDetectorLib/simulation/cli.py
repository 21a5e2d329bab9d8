"""``cmbdetector synth``: simulate subjects with microbleeds and mimics (see :mod:`simulation`).

Writes, per subject, ``sub-<seed>_<modality>.nii.gz`` for the requested modalities plus the
CMB / mimic label maps, brain mask and ``sub-<seed>_truth.json``. ``--demo`` regenerates the
bundled demo scan (CMBDetector/Resources/SampleData/CMBDemo_SWI*) from its fixed seed.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import InputError

DEMO_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def configure_parser(parser) -> None:
    parser.add_argument("--n", type=int, default=1, help="number of subjects (default 1)")
    parser.add_argument("--modality", action="append", choices=["swi", "gre", "qsm", "all"],
                        help="image(s) to write; repeat for several (default: all three)")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first subject; subject i uses seed+i (default 0)")
    parser.add_argument("--roi-mm", type=float, default=None,
                        help="crop the field of view to a cube of this size (mm); fast subjects")
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        metavar=("IN_PLANE", "IN_PLANE2", "SLICE"),
                        help="voxel size in mm (default: random 0.45-1 in-plane, 0.6-3 slice)")
    parser.add_argument("--te", type=float, default=None, help="echo time ms (default 15-40)")
    parser.add_argument("--b0", type=float, default=None, help="field strength T (1.5 or 3)")
    parser.add_argument("--n-cmbs", type=int, nargs="+", default=None, metavar="N",
                        help="CMBs per subject: N, or LO HI (default heavy-tailed 0-20)")
    parser.add_argument("--min-visible-mm", type=float, default=0.0, metavar="D",
                        help="redraw random CMBs whose visible footprint on GRE is under D mm "
                             "(rater criterion: 2; default 0 keeps every drawn CMB)")
    parser.add_argument("--no-labels", action="store_true",
                        help="skip label maps and brain mask (truth JSON is always written)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="parallel worker processes (default 1)")
    parser.add_argument("--split", choices=("train", "validation", "test", "cross_domain"),
                        help="draw each subject's anatomy, processing and lesions for this split "
                        "(simulation/domains.py; --seed then counts from the split's first "
                        "seed); cross_domain = the held-out anatomy and processing families")
    parser.add_argument("--size-prior", choices=("training", "real"), default=None,
                        help="CMB and calcification sizes from this prior, replacing the "
                        "split's (validation draws the training prior, large CMBs "
                        "over-represented; real = the sizes of the test splits)")
    parser.add_argument("--allow-missing-anatomies", action="store_true",
                        help="with --split, simulate even when an anatomy is not installed "
                        "(the seeds then draw other subjects than with all installed)")
    parser.add_argument("--demo", action="store_true",
                        help="regenerate the bundled demo scan (into --out if given)")


def _progress(done: int, total: int, t0: float, width: int = 30) -> None:
    frac = done / max(total, 1)
    bar = "#" * int(round(frac * width))
    el = time.perf_counter() - t0
    eta = el / done * (total - done) if done else 0.0
    sys.stderr.write(f"\rsynth [{bar:<{width}}] {done}/{total}  {el:6.1f}s  eta {eta:6.1f}s")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _one(job):
    from .simulator import simulate_subject, write_subject

    seed, cfg, out, mods, labels = job
    sub = simulate_subject(seed, cfg)
    write_subject(sub, out, f"sub-{seed:05d}", modalities=mods, labels=labels)
    return seed, len(sub.truth["cmbs"]), sub.timings.get("total", 0.0)


def _sizes(prior: str | None) -> dict:
    """The SimulationConfig overrides that ``--size-prior`` stands for (none without it)."""
    return {"cmb_size_prior": prior, "calc_size_prior": prior} if prior else {}


def _split_jobs(split: str, n: int, start: int, cfg, out: Path, mods, labels,
                size_prior: str | None = None, allow_missing: bool = False) -> list:
    """One job per subject of ``split`` with its drawn domain (sizes from ``size_prior`` when
    given); the domains go to ``domains.json`` beside the subjects (what evaluation groups by).
    Refuses when an anatomy is not installed (unless ``allow_missing``): its seeds would then
    be other subjects than the same seeds elsewhere."""
    import json

    from .anatomies import available_anatomies
    from .domains import domain_config, draw_domain, missing_anatomies, split_seeds

    anatomies = available_anatomies()
    missing = missing_anatomies(anatomies)
    if missing and not allow_missing:
        raise InputError(f"synth --split {split}: anatomies not installed here: "
                         f"{', '.join(missing)} (run `make anatomies`); without them each seed "
                         "draws another subject (--allow-missing-anatomies to go on anyway)")
    seeds = split_seeds(split, n, start)
    try:
        domains = {f"sub-{s:05d}": {**draw_domain(s, split, anatomies), **_sizes(size_prior)}
                   for s in seeds}
    except ValueError as exc:
        raise InputError(f"synth: {exc}") from None
    path = out / "domains.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **domains}, indent=1))
    return [(s, replace(domain_config(s, split, cfg, anatomies), **_sizes(size_prior)), out,
             mods, labels) for s in seeds]


def run_command(args) -> int:
    from .simulator import SimulationConfig, make_demo

    if args.demo:
        out = Path(args.out) if args.out else DEMO_DIR
        paths = make_demo(out)
        for p in paths.values():
            print(p)
        return 0
    if args.out is None:
        raise InputError("synth: --out DIR is required")
    if args.n < 1:
        raise InputError("synth: --n must be at least 1")
    mods = args.modality or ["all"]
    mods = ("gre", "swi", "qsm") if "all" in mods else tuple(dict.fromkeys(mods))
    n_cmbs = None
    if args.n_cmbs:
        if len(args.n_cmbs) > 2 or min(args.n_cmbs) < 0:
            raise InputError("synth: --n-cmbs takes N or LO HI (non-negative)")
        n_cmbs = args.n_cmbs[0] if len(args.n_cmbs) == 1 else tuple(args.n_cmbs)
    if args.b0 is not None and args.b0 <= 0:
        raise InputError("synth: --b0 must be positive")
    if args.min_visible_mm < 0:
        raise InputError("synth: --min-visible-mm must be >= 0")
    cfg = SimulationConfig(roi_mm=args.roi_mm, spacing_mm=tuple(args.spacing) if args.spacing
                           else None, te_ms=args.te, b0_t=args.b0, n_cmbs=n_cmbs,
                           min_visible_diameter_mm=args.min_visible_mm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.split:
        jobs = _split_jobs(args.split, args.n, args.seed, cfg, out, mods, not args.no_labels,
                           args.size_prior, args.allow_missing_anatomies)
    else:
        cfg = replace(cfg, **_sizes(args.size_prior))
        jobs = [(args.seed + i, cfg, out, mods, not args.no_labels) for i in range(args.n)]
    t0 = time.perf_counter()
    _progress(0, len(jobs), t0)
    n_total = 0
    if args.jobs > 1 and len(jobs) > 1:
        from ..workers import process_pool

        with process_pool(args.jobs) as ex:
            for i, (_, n, _) in enumerate(ex.map(_one, jobs), 1):
                n_total += n
                _progress(i, len(jobs), t0)
    else:
        for i, job in enumerate(jobs, 1):
            n_total += _one(job)[1]
            _progress(i, len(jobs), t0)
    el = time.perf_counter() - t0
    print(f"{len(jobs)} subject(s), {n_total} CMBs -> {out} ({el / len(jobs):.1f} s/subject)")
    return 0
