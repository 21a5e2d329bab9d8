"""``cmbdetector detect``: detection on one or more scan files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .. import MODALITIES
from ..errors import CMBError, InputError
from ..engine.progress import ProgressBar


def configure_parser(p) -> None:
    p.add_argument("scans", nargs="+", metavar="SCAN",
                   help="NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("--modality", required=True, choices=MODALITIES,
                   help="swi, gre (T2*-weighted GRE magnitude) or qsm")
    p.add_argument("--output-dir", required=True, type=Path, help="where outputs are written")
    p.add_argument("--mask", type=Path, help="brain mask on the scan's grid (one scan only)")
    p.add_argument("--threshold", type=float, help="student confidence threshold "
                   "for every modality (default: the bundled models' validated "
                   "threshold for the scan's modality)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", type=Path, help="weights folder (default: bundled)")
    p.add_argument("--truth", type=Path, help="ground-truth JSON (simulator format): print how "
                   "many true CMBs were found")
    p.add_argument("--locate", action="store_true", help="anatomical location per lesion "
                   "(MNI registration): category/region/side columns + <stem>_summary.json")
    p.add_argument("--report", action="store_true", help="one-page HTML report "
                   "<stem>_report.html (implies --locate)")
    p.add_argument("--quiet", action="store_true", help="no lesion table on stdout")


def print_table(lesions, stream=sys.stdout) -> None:
    if not lesions:
        print("no microbleeds detected", file=stream)
        return
    print(f"{'label':<8}{'R':>8}{'A':>8}{'S':>8}{'vol mm3':>9}{'diam mm':>9}{'conf':>7}",
          file=stream)
    for les in lesions:
        r, a, s = les.centroid_ras
        print(f"{les.label:<8}{r:8.1f}{a:8.1f}{s:8.1f}{les.volume_mm3:9.1f}"
              f"{les.diameter_mm:9.1f}{les.confidence:7.2f}", file=stream)


def compare_with_truth(lesions, truth_path: Path, tolerance_mm: float = 5.0) -> str:
    """"found X of Y": a true CMB counts as found when a lesion centroid lies within
    ``tolerance_mm`` (VALDO's centroid rule)."""
    try:
        truth = json.loads(Path(truth_path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{truth_path}: cannot read ground truth ({exc})") from None
    true_c = np.array([c["centre_ras"] for c in truth.get("cmbs", [])], float).reshape(-1, 3)
    pred = np.array([les.centroid_ras for les in lesions], float).reshape(-1, 3)
    if len(true_c) and len(pred):
        d = np.linalg.norm(true_c[:, None] - pred[None], axis=2)
        found = int((d.min(1) <= tolerance_mm).sum())
        fp = int((d.min(0) > tolerance_mm).sum())
    else:
        found, fp = 0, len(pred)
    return (f"found {found} of {len(true_c)} true microbleeds "
            f"({fp} detection(s) matched no true microbleed; {tolerance_mm:g} mm rule)")


def write_located_outputs(volume, result, args, bar=None) -> dict:
    """The four standard outputs, plus location columns/summary and the report on request."""
    from ..engine.outputs import write_outputs

    loc = None
    if args.locate or args.report:
        from ..location.locate import locate_result
        if bar is not None:
            bar(1.0, "location (MNI registration)")
        loc = locate_result(volume, result)
    extra = None
    if loc is not None:
        from ..location.locate import location_extra
        extra = location_extra(loc)
    paths = write_outputs(volume, result, args.output_dir, extra=extra)
    if loc is not None:
        from ..location.locate import summary_path_for, write_summary_json
        paths["summary"] = write_summary_json(summary_path_for(paths["csv"]), loc)
        if loc.quality.warning:
            print(f"cmbdetector: warning: {loc.quality.warning}", file=sys.stderr)
    if args.report:
        from ..location.report import write_report
        name = Path(paths["csv"]).name[: -len("_lesions.csv")]
        paths["report"] = write_report(Path(args.output_dir) / f"{name}_report.html", volume,
                                       result.lesions(), loc, result.model_version,
                                       result.modality, result.threshold)
    return paths


def _scan_failed(bar, exc) -> None:
    bar.close()
    print(f"cmbdetector: error: {exc}", file=sys.stderr)


def run_command(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from ..engine.detection import default_settings, detect, detect_prepared, prepare_scan
    from ..engine.models import load_bundle, read_manifest
    from ..engine.naming import MIN_IP_NOTE, looks_like_projection
    from ..engine.projection import is_note
    from ..engine.volume import read_volume

    if args.mask and len(args.scans) > 1:
        raise InputError("--mask applies to one scan; run scans with masks one at a time")
    # The operating point is in the manifest, so the first scan is read and prepared while
    # torch is imported and the weights are verified and loaded in a thread (about 1.2 s of
    # start-up on 2 cores, overlapped with reading and preprocessing). That scan's radial
    # symmetry transform is the CPU one; later scans compute it where the networks run.
    settings = default_settings(read_manifest(args.models).get("inference", {}),
                                threshold=args.threshold, device=args.device)
    failures = 0
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load_bundle, args.models, device=args.device)
        models = None
        for n, scan in enumerate(args.scans, start=1):
            bar = ProgressBar(f"[{n}/{len(args.scans)}] {Path(scan).name}")
            prepared = None
            if looks_like_projection(Path(scan).name):
                print(f"cmbdetector: note: {Path(scan).name}: {MIN_IP_NOTE}", file=sys.stderr)
            try:
                volume = read_volume(scan)
                mask = read_volume(args.mask) if args.mask else None
                if models is None:
                    prepared = prepare_scan(volume, args.modality, mask, settings)
            except CMBError as exc:
                _scan_failed(bar, exc)
                failures += 1
                continue
            if models is None:
                try:  # a model or device error ends the run, as before any scan was read
                    models = loading.result()
                except BaseException:
                    bar.close()
                    raise
            try:
                progress = lambda stage, f: bar(f, stage)  # noqa: E731
                result = detect_prepared(prepared, models, progress) if prepared is not None \
                    else detect(volume, args.modality, mask, settings, models, progress)
                paths = write_located_outputs(volume, result, args, bar)
            except CMBError as exc:
                _scan_failed(bar, exc)
                failures += 1
                continue
            bar.close()
            for text in filter(is_note, result.warnings):
                print(f"cmbdetector: note: {Path(scan).name}: {text}", file=sys.stderr)
            lesions = result.lesions()
            if not args.quiet:
                print(f"{volume.name}: {len(lesions)} microbleed(s) at confidence >= "
                      f"{result.threshold:.2f}  [{', '.join(str(p) for p in paths.values())}]")
                print_table(lesions)
                if "summary" in paths:
                    from ..location.locate import summary_lines
                    summary = json.loads(Path(paths["summary"]).read_text())
                    print("\n".join(summary_lines(summary.get("summary", summary))))
            if args.truth:
                print(compare_with_truth(lesions, args.truth))
    if failures:
        print(f"cmbdetector: {failures} of {len(args.scans)} scan(s) failed", file=sys.stderr)
    return 1 if failures else 0
