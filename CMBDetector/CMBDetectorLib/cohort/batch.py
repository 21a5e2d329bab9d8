"""Cohort processing on Dask: every scan of a folder, BIDS dataset or CSV, resumable.

Population studies hold tens of thousands of scans; one machine is too slow, and groups already
run a cluster. So the scheduling is Dask's (``dask.distributed``), not ours: by default an
embedded ``LocalCluster`` on this machine, or any running cluster via ``--scheduler``. Each scan
is one Dask task that runs the same engine as ``cmbdetector detect``.

Guarantees
----------
* **Atomic outputs.** A task writes into a hidden per-scan temporary folder and renames it to
  ``<output-dir>/<scan>/`` only when every file, the completion record ``<scan>.done.json``
  last, is written. A killed run leaves at most a hidden ``.<scan>.tmp-*`` folder, never a
  half result that looks finished.
* **Resumable.** A scan is skipped when its folder holds a completion record whose input
  fingerprint (size + mtime, and sha256 when those changed), settings hash and engine version
  match. Anything else is processed again.
* **Failures are data.** A scan that fails is a row with ``status=failed`` and the reason in
  ``cohort.csv``; the others go on. A lost worker's scans are rescheduled elsewhere by Dask
  (``allowed-failures``), and exceptions outside the scan itself are retried (``retries``).

The per-scan work is a plain function ``process(path, modality, out_dir, stem, settings, threads)``
named by a dotted path (``package.module:function`` or ``/file.py:function``) so it pickles to
workers by name. Production uses :func:`engine_process`; tests and cluster plumbing checks use
:func:`blob_process`, which needs no weights.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import MODALITIES, __version__
from ..errors import CMBError, InputError

#: The production per-scan function.
ENGINE_PROCESS = "CMBDetectorLib.cohort.batch:engine_process"
#: A weight-free stand-in (dark-blob counter) for tests and cluster plumbing checks.
BLOB_PROCESS = "CMBDetectorLib.cohort.batch:blob_process"

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: BIDS suffix -> engine modality (SWI and T2*-weighted GRE magnitude, QSM susceptibility map).
BIDS_SUFFIXES = {"swi": "swi", "T2starw": "gre", "Chimap": "qsm"}
#: Categories counted when the lesion table carries a ``category`` column (location module).
CATEGORY_ORDER = ("lobar", "deep", "infratentorial")
#: Settings that change speed, not results; left out of the settings hash.
_NOT_IN_HASH = ("device", "batch_size")

COHORT_COLUMNS = ["subject", "session", "modality", "scan", "path", "status", "cmb_count",
                  "runtime_s", "model_version", "reason"]


# --------------------------------------------------------------------------------- discovery
@dataclass
class Scan:
    """One scan of the cohort. ``key`` names its output folder (unique in the cohort)."""

    path: str
    modality: str
    subject: str = ""
    session: str = ""
    key: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _image_stem(name: str) -> str | None:
    low = name.lower()
    for ext in IMAGE_SUFFIXES:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def _guess_modality(name: str) -> str | None:
    """Modality from a file name (``..._swi``, ``..._T2starw``, ``..._Chimap``, ``gre``, ``qsm``)."""
    tokens = [t.lower() for t in re.split(r"[^A-Za-z0-9]+", name) if t]
    for suffix, modality in BIDS_SUFFIXES.items():
        if suffix.lower() in tokens:
            return modality
    for modality in MODALITIES:
        if modality in tokens:
            return modality
    if any(t in ("t2star", "t2s", "t2starw") for t in tokens):
        return "gre"
    return None


def _entities(name: str) -> dict:
    return dict(part.split("-", 1) for part in name.split("_") if "-" in part)


def is_bids(folder) -> bool:
    folder = Path(folder)
    return (folder / "dataset_description.json").is_file() or any(
        p.is_dir() for p in folder.glob("sub-*"))


def discover_bids(root, modality: str | None = None) -> list:
    """Scans of a BIDS dataset: ``sub-*/[ses-*/]anat/*_{swi,T2starw,Chimap}.nii[.gz]``.

    Subject and session come from the entities; ``derivatives/`` and ``sourcedata/`` are ignored.
    ``modality`` keeps only that modality.
    """
    root = Path(root)
    scans = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for anat in sorted(list(sub.glob("anat")) + list(sub.glob("ses-*/anat"))):
            for f in sorted(anat.iterdir()):
                s = _image_stem(f.name)
                if s is None or "_" not in s:
                    continue
                mod = BIDS_SUFFIXES.get(s.rsplit("_", 1)[1])
                if mod is None or (modality and mod != modality):
                    continue
                ent = _entities(s)
                scans.append(Scan(str(f), mod, "sub-" + ent.get("sub", sub.name[4:]),
                                  "ses-" + ent["ses"] if "ses" in ent else "", s))
    return scans


def discover_folder(folder, modality: str | None = None) -> list:
    """Image files directly in ``folder``; modality from ``modality`` or the file name."""
    scans = []
    for f in sorted(Path(folder).iterdir()):
        s = _image_stem(f.name)
        if s is None or f.name.startswith("."):
            continue
        mod = modality or _guess_modality(s)
        if mod is None:
            raise InputError(f"{f}: cannot tell the modality from the name; pass --modality")
        scans.append(Scan(str(f), mod, "", "", s))
    return scans


def discover_csv(path, modality: str | None = None) -> list:
    """Rows ``path, modality[, subject][, session]``; relative paths are relative to the CSV."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    scans = []
    for n, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row.get("path"):
            raise InputError(f"{path}:{n}: a 'path' column is required")
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        mod = (row.get("modality") or modality or _guess_modality(p.name) or "").lower()
        if mod not in MODALITIES:
            raise InputError(f"{path}:{n}: modality must be one of {', '.join(MODALITIES)}, "
                             f"got {mod or 'nothing'!r}")
        scans.append(Scan(str(p), mod, row.get("subject", "") or row.get("subject_id", ""),
                          row.get("session", ""), _image_stem(p.name) or p.name))
    return scans


def discover(source, modality: str | None = None) -> list:
    """Scans of a folder, BIDS dataset or CSV, each with a unique output ``key``."""
    source = Path(source)
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InputError(f"{source}: INPUT must be a folder, a BIDS dataset or a CSV")
        scans = discover_csv(source, modality)
    elif is_bids(source):
        scans = discover_bids(source, modality)
    else:
        scans = discover_folder(source, modality)
    if not scans:
        raise InputError(f"{source}: no scans found")
    return _unique_keys(scans)


def _unique_keys(scans: list) -> list:
    """Two CSV rows can name ``a/swi.nii.gz`` and ``b/swi.nii.gz``: prefix subject, then folder."""
    def clean(s):
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("._") or "scan"

    for s in scans:
        s.key = clean(s.key)
    for prefix in (lambda s: s.subject, lambda s: Path(s.path).parent.name):
        counts: dict = {}
        for s in scans:
            counts[s.key] = counts.get(s.key, 0) + 1
        for s in scans:
            if counts[s.key] > 1 and prefix(s):
                s.key = clean(f"{prefix(s)}_{s.key}")
    seen: dict = {}
    for s in scans:
        n = seen.get(s.key, 0)
        seen[s.key] = n + 1
        if n:
            s.key = f"{s.key}_{n + 1}"
    return scans


# ----------------------------------------------------------------------------- fingerprints
def file_sha256(path) -> str:
    """sha256 of a file, or of a folder's files (names and contents) for DICOM series."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def quick_stat(path) -> dict:
    """Size (bytes) and mtime (ns) of a file, or summed/maxed over a folder's files."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return {"size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def settings_hash(settings: dict, process: str) -> str:
    """Hash of what determines the outputs: result-relevant settings and the process."""
    relevant = {k: v for k, v in sorted(settings.items()) if k not in _NOT_IN_HASH}
    blob = json.dumps({"settings": relevant, "process": process}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def engine_version(process: str) -> str:
    """What produced the outputs: package version plus, for the engine, the weights manifest.

    The manifest lists every weight file's sha256 and the validated operating point, so hashing
    it (a small JSON, cheap on a login node) covers a retrained or re-tuned bundle. Raises
    :class:`ModelError` here, before any cluster starts, when there are no weights. A process
    can define ``version()`` to say its own.
    """
    func = resolve_process(process)
    own = getattr(func, "version", None)
    if callable(own):
        return str(own())
    from ..engine.models import read_manifest

    manifest = read_manifest()
    blob = json.dumps(manifest, sort_keys=True, default=str).encode()
    return (f"cmbdetector-{__version__}+models-{manifest.get('version', 'unknown')}-"
            f"{hashlib.sha256(blob).hexdigest()[:12]}")


def resolve_process(spec: str):
    """``package.module:function`` or ``/path/file.py:function`` -> the function."""
    if callable(spec):
        return spec
    if ":" not in spec:
        mod_name, _, func = spec.rpartition(".")
    else:
        mod_name, _, func = spec.rpartition(":")
    if mod_name.endswith(".py"):
        name = "cmb_cohort_" + hashlib.sha1(mod_name.encode()).hexdigest()[:10]
        module = sys.modules.get(name)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(name, mod_name)
            if spec_ is None:
                raise InputError(f"cannot load process from {mod_name}")
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module
            spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    try:
        return getattr(module, func)
    except AttributeError:
        raise InputError(f"process {spec!r}: {mod_name} has no {func!r}") from None


# ------------------------------------------------------------------------- completion records
def done_path(out_root, key: str) -> Path:
    return Path(out_root) / key / f"{key}.done.json"


def read_done(out_root, key: str) -> dict | None:
    """The completion record of a scan, or None when absent, unreadable or its files are gone."""
    p = done_path(out_root, key)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    folder = p.parent
    if not all((folder / name).is_file() for name in rec.get("files", [])):
        return None
    return rec


def is_current(rec: dict | None, scan: Scan, shash: str, version: str,
               check_sha: bool = False) -> bool:
    """Whether a completion record still describes ``scan`` with these settings and engine."""
    if not rec or rec.get("settings_hash") != shash or rec.get("engine_version") != version:
        return False
    # The path itself is not compared: a cohort moved to another mount (mtimes kept) is
    # still done; the output key ties record and scan together.
    if not Path(scan.path).exists():
        return False
    if rec.get("input_stat") == quick_stat(scan.path):
        return True
    return check_sha and rec.get("input_sha256") == file_sha256(scan.path)


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------- the task
def _set_threads(threads: int | None) -> None:
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    import SimpleITK as sitk  # this task's own process: a process-wide limit is fine here

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))


def run_scan(scan: dict, out_root: str, config: dict, prepared=None) -> dict:
    """The Dask task for one scan: skip if current, else process into a temporary folder, commit.

    Returns a cohort row (``status`` done / skipped / failed). Errors of the scan itself become a
    failed row; only infrastructure errors (disk full on the output share...) propagate so Dask
    retries them. ``prepared`` (prefetch mode) is what the process's ``prepare`` returned for
    this scan in another process, or the exception it raised there.
    """
    scan = Scan(**scan)
    out_root = Path(out_root)
    t0 = time.perf_counter()
    row = {"subject": scan.subject, "session": scan.session, "modality": scan.modality,
           "scan": scan.key, "path": scan.path, "status": "failed", "cmb_count": "",
           "runtime_s": "", "model_version": "", "reason": ""}
    shash, version = config["settings_hash"], config["engine_version"]
    rec = read_done(out_root, scan.key)
    if rec and is_current(rec, scan, shash, version, check_sha=True):
        # Same run: Dask recomputed a finished task whose result died with its worker.
        same_run = rec.get("run_id") == config.get("run_id")
        return _row_from_record(row, rec, "done" if same_run else "skipped")
    _set_threads(config.get("threads"))
    final = out_root / scan.key
    tmp = out_root / f".{scan.key}.tmp-{config.get('run_id', '')[:8]}-{uuid.uuid4().hex[:8]}"
    try:
        if not Path(scan.path).exists():
            raise InputError(f"{scan.path}: no such file or folder")
        tmp.mkdir(parents=True)
        stat = quick_stat(scan.path)
        sha = file_sha256(scan.path)
        process = resolve_process(config["process"])
        if isinstance(prepared, BaseException):
            raise prepared
        more = {} if prepared is None else {"prepared": prepared}
        info = process(scan.path, scan.modality, str(tmp), scan.key, dict(config["settings"]),
                       config.get("threads"), **more)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        record = {"scan": scan.key, "input_path": str(scan.path), "input_stat": stat,
                  "input_sha256": sha, "modality": scan.modality, "subject": scan.subject,
                  "session": scan.session, "settings_hash": shash, "engine_version": version,
                  "model_version": info.get("model_version", ""),
                  "cmb_count": int(info["cmb_count"]), "categories": info.get("categories", {}),
                  "runtime_s": round(time.perf_counter() - t0, 3), "files": files,
                  "run_id": config.get("run_id", ""), "note": info.get("note", ""),
                  "timings_s": info.get("timings_s", {}),
                  "host": os.uname().nodename, "pid": os.getpid(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cmbdetector": __version__}
        # The record goes last: its presence in the final folder means everything is there.
        _write_json_atomic(tmp / f"{scan.key}.done.json", record)
        _commit(tmp, final)
        return dict(_row_from_record(row, record, "done"), timings_s=record["timings_s"])
    except CMBError as exc:
        row["reason"] = _one_line(str(exc))
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError, MemoryError,
            ArithmeticError, AttributeError, ImportError) as exc:
        row["reason"] = _one_line(f"{type(exc).__name__}: {exc}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    row["runtime_s"] = round(time.perf_counter() - t0, 3)
    return row


def _commit(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp``: old results are moved aside first, then removed.

    Killed between the two renames, the scan simply has no folder and is processed again.
    """
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _row_from_record(row: dict, rec: dict, status: str) -> dict:
    row = dict(row)
    row.update(status=status, cmb_count=rec.get("cmb_count", ""),
               runtime_s=rec.get("runtime_s", ""), model_version=rec.get("model_version", ""),
               reason=rec.get("note", ""))
    for cat, n in (rec.get("categories") or {}).items():
        row[f"n_{cat}"] = n
    return row


# ------------------------------------------------------------------------ process functions
def _count_categories(lesions_csv: Path) -> dict:
    """Counts per location category when the lesion table has a ``category`` column."""
    if not lesions_csv.is_file():
        return {}
    with open(lesions_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        col = next((c for c in (reader.fieldnames or []) if c.lower() in
                    ("category", "location_category")), None)
        if col is None:
            return {}
        counts: dict = {}
        for r in reader:
            cat = (r.get(col) or "").strip().lower() or "unknown"
            counts[cat] = counts.get(cat, 0) + 1
    return counts


def engine_process(path, modality, out_dir, stem, settings, threads=None, prepared=None) -> dict:
    """Production per-scan work: ``detect_file`` then ``write_outputs`` (as ``cmbdetector detect``).

    ``settings`` holds overrides of the bundled models' validated operating point (e.g.
    ``threshold``, ``device``) plus the cohort option ``location`` (default on): MNI
    registration and lobar/deep/infratentorial category per lesion, added to the lesion table
    and counted in ``cohort.csv``. A location failure does not fail the scan (its counts are
    left empty and the reason is kept in the completion record). Files are named after ``stem``
    so cohorts with many ``swi.nii.gz`` stay apart. ``prepared`` is :func:`engine_prepare`'s
    result (prefetch mode): the scan is then read and preprocessed already. ``timings_s`` in the
    returned dict has the seconds of every stage.
    """
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from ..engine.detection import default_settings, detect_file, detect_prepared
    from ..engine.outputs import write_outputs

    overrides = dict(settings)
    want_location = bool(overrides.pop("location", True))
    models = _cached_models(overrides.get("device", "auto"))
    s = default_settings(models, **overrides)
    if prepared is None:
        volume, result = detect_file(path, modality, settings=s, models=models)
        timings = dict(result.timings)
    else:
        volume, result = prepared.volume, detect_prepared(prepared, models)
        timings = dict(result.timings, reading=prepared.read_s)
    t0 = time.perf_counter()
    threshold = s.threshold_for(result.modality)
    lesions = result.lesions(threshold)
    extra, categories, note = None, {}, ""
    if want_location and lesions:
        try:
            from ..location.locate import register_to_mni

            reg = register_to_mni(volume, brain_mask=result.brain_mask, modality=modality)
            loc = reg.locate(lesions)
            extra = {x.id: x.columns() for x in loc.lesions}
            categories = dict(loc.summary.get("by_category", {}))
            if not reg.quality.ok:
                note = f"location: {reg.quality.warning}"
        except ImportError as exc:
            note = f"location unavailable: {exc}"
        except (CMBError, RuntimeError, ValueError) as exc:
            note = _one_line(f"location failed: {exc}")
    elif want_location:
        categories = {c: 0 for c in CATEGORY_ORDER}
    timings["location"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_outputs(volume, result, out_dir, threshold=threshold, name=stem, extra=extra)
    timings["writing"] = time.perf_counter() - t0
    return {"cmb_count": len(lesions), "model_version": result.model_version,
            "categories": categories, "note": note,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}


def engine_prepare(path, modality, settings):
    """Prefetch half of :func:`engine_process`: read and preprocess, no networks, no torch.

    The operating point comes from the weights' manifest, as :func:`engine_process` gets it
    from the loaded bundle."""
    from types import SimpleNamespace

    from ..engine.detection import default_settings, prepare_file
    from ..engine.models import read_manifest

    overrides = {k: v for k, v in settings.items() if k != "location"}
    manifest = SimpleNamespace(settings=read_manifest().get("inference", {}))
    return prepare_file(path, modality, settings=default_settings(manifest, **overrides))


engine_process.prepare = engine_prepare


_MODELS: dict = {}


def _cached_models(device: str = "auto"):
    """The bundled weights, verified and loaded once per worker process, not once per scan."""
    if device not in _MODELS:
        from ..engine.models import load_bundle

        _MODELS[device] = load_bundle(device=device)
    return _MODELS[device]


def blob_process(path, modality, out_dir, stem, settings, threads=None, prepared=None) -> dict:
    """Weight-free stand-in with the engine's file layout: counts dark blobs, writes outputs.

    Dark = robust z-score below -5 inside the non-zero region (above +5 for QSM, where CMBs are
    paramagnetic). For tests and for checking a cluster's plumbing (``--process blobs``); it is
    not a detector.
    """
    import numpy as np
    from scipy import ndimage

    from ..engine.volume import read_volume, write_volume

    vol = read_volume(path) if prepared is None else prepared
    a = np.asarray(vol.array, np.float32)
    fg = a != 0
    if not fg.any():
        raise InputError(f"{path}: empty scan")
    med = float(np.median(a[fg]))
    mad = 1.4826 * float(np.median(np.abs(a[fg] - med))) + 1e-6
    z = (a - med) / mad
    z = -z if modality == "qsm" else z
    labels, n = ndimage.label((z < -5.0) & fg)
    out = Path(out_dir)
    write_volume(vol.with_array(labels.astype(np.uint16)), out / f"{stem}_cmb.nii.gz")
    centres = ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1)) if n else []
    ras = vol.ijk_to_ras_points([c[::-1] for c in centres]) if n else []
    with open(out / f"{stem}_lesions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "R", "A", "S", "category"])
        for i, p in enumerate(ras, start=1):
            w.writerow([i, f"CMB-{i}", *(round(float(x), 2) for x in p),
                        "deep" if i % 2 else "lobar"])
    (out / f"{stem}_detection.json").write_text(json.dumps(
        {"modality": modality, "model_version": "blob-stand-in", "count": int(n)}))
    (out / f"{stem}.mrk.json").write_text(json.dumps({"markups": []}))
    return {"cmb_count": int(n), "model_version": "blob-stand-in",
            "categories": _count_categories(out / f"{stem}_lesions.csv")}


blob_process.version = lambda: "blob-stand-in-1"


def _blob_prepare(path, modality, settings):
    from ..engine.volume import read_volume

    return read_volume(path)


blob_process.prepare = _blob_prepare


# ------------------------------------------------------------------------------ the cluster
def plan_local_cluster(cores: int | None = None, memory_gb: float | None = None,
                       workers: int | None = None, gb_per_worker: float = 3.0) -> tuple:
    """``(n_workers, torch_threads_per_worker)`` with ``n_workers * threads <= cores``.

    Each worker runs one scan at a time (one Dask thread) and gives torch the cores it owns, so
    the machine is used fully without oversubscription. Default: half as many workers as cores
    (2 torch threads each use a core pair better than 2 workers fight over memory bandwidth),
    and no more workers than ``memory_gb / gb_per_worker`` (one scan's detection peak).
    """
    cores = cores or _cpu_count()
    if workers is None:
        workers = max(1, cores // 2)
        if memory_gb:
            workers = max(1, min(workers, int(memory_gb // gb_per_worker)))
    workers = max(1, min(int(workers), cores))
    return workers, max(1, cores // workers)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def start_local_cluster(workers: int | None = None, threads: int | None = None):
    """An embedded LocalCluster planned by :func:`plan_local_cluster`; returns (cluster, threads)."""
    from distributed import LocalCluster

    n, t = plan_local_cluster(workers=workers, memory_gb=_memory_gb())
    t = threads or t
    env = {v: str(t) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    dashboard = ":8787" if importlib.util.find_spec("bokeh") else ":0"
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           dashboard_address=dashboard, env=env, silence_logs=40)
    return cluster, t


def _has_bokeh() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def dashboard_link(client) -> str | None:
    """The dashboard URL when the scheduler runs one (needs bokeh), else None."""
    try:
        # The scheduler serves /status only with bokeh installed (on the scheduler's machine).
        if (client.scheduler_info().get("services", {}).get("dashboard")
                and client.run_on_scheduler(_has_bokeh)):
            return client.dashboard_link
    except Exception:  # noqa: BLE001 - the link is a convenience, never a failure
        return None
    return None


# ------------------------------------------------------------------------------ the driver
@dataclass
class CohortReport:
    rows: list = field(default_factory=list)
    table: str = ""
    elapsed_s: float = 0.0
    summary: dict = field(default_factory=dict)  # throughput; also in ``cohort_summary.json``

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def _prepared_scans(source, modality: str | None, scans: list | None) -> list:
    """The scans to process (given, or discovered in ``source``), unique keys, absolute paths."""
    scans = list(scans) if scans is not None else discover(source, modality)
    scans = _unique_keys([Scan(**s.as_dict()) for s in scans])
    for s in scans:  # workers may run elsewhere, in another working directory
        s.path = os.path.abspath(s.path)
    return scans


def _split_done(scans: list, out_root: Path, shash: str, version: str) -> tuple:
    """Rows of the scans already done with these settings and engine (``skipped``), and the
    scans still to do."""
    rows: dict = {}
    todo = []
    for s in scans:  # cheap skip on the driver: size+mtime; the task re-checks with sha256
        rec = read_done(out_root, s.key)
        if is_current(rec, s, shash, version):
            rows[s.key] = _row_from_record(
                {"subject": s.subject, "session": s.session, "modality": s.modality,
                 "scan": s.key, "path": s.path}, rec, "skipped")
        else:
            todo.append(s)
    return rows, todo


def _process_on_dask(todo: list, n_done: int, out_root: Path, config: dict, client,
                     scheduler: str | None, workers: int | None, threads: int | None,
                     retries: int, bar, progress) -> dict:
    """Rows of ``todo`` processed on ``client``, on ``scheduler``'s cluster, or on a
    LocalCluster; a client or cluster opened here is closed here, whatever happens."""
    own_cluster = own_client = None
    try:
        if client is None:
            from distributed import Client

            if scheduler:
                try:
                    own_client = client = Client(scheduler, timeout="30s")
                except OSError as exc:
                    raise InputError(f"cannot reach Dask scheduler {scheduler}: "
                                     f"{_one_line(str(exc))}") from None
            else:
                own_cluster, t = start_local_cluster(workers, threads)
                config["threads"] = threads or t
                own_client = client = Client(own_cluster)
        link = dashboard_link(client)
        if progress:
            nw = len(client.scheduler_info().get("workers", {}))
            msg = f"cohort: {len(todo)} to process, {n_done} already done, {nw} workers"
            print(msg + (f"; dashboard {link}" if link else ""), file=sys.stderr)
        return _submit_all(client, todo, out_root, config, retries, bar, progress)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()


def _remove_attempt_leftovers(out_root: Path, run_id: str) -> None:
    """Once every task of the run has ended, delete the temporary folders of attempts killed
    with their worker (never renamed, so they never looked finished)."""
    for p in out_root.glob(f".*.tmp-{run_id[:8]}-*"):
        shutil.rmtree(p, ignore_errors=True)


def run_cohort(source, out_root, modality: str | None = None, settings=None,
               scheduler: str | None = None, workers: int | None = None,
               process: str = ENGINE_PROCESS, client=None, retries: int = 2,
               threads: int | None = None, progress=True, scans: list | None = None,
               prefetch: int = 0) -> CohortReport:
    """Process every scan of ``source`` on Dask; write per-scan folders and ``cohort.csv``.

    Parameters
    ----------
    source : folder, BIDS dataset or CSV (ignored when ``scans`` is given).
    out_root : output folder; ``<out_root>/<scan>/`` per scan, ``<out_root>/cohort.csv``.
    settings : dict of overrides of the bundled models' operating point (e.g. ``threshold``,
        ``device``, and the cohort option ``location``), or a full DetectionSettings.
    scheduler : ``tcp://host:port`` of a running cluster; None starts a LocalCluster.
    workers : LocalCluster worker processes (default from :func:`plan_local_cluster`).
    process : dotted path of the per-scan function (see module docstring).
    client : an existing ``distributed.Client`` (takes precedence over ``scheduler``).
    retries : Dask retries for infrastructure errors; lost workers are covered by Dask's
        ``distributed.scheduler.allowed-failures``.
    progress : True for a progress bar on stderr, or a callable ``(done, total)``.
    prefetch : N > 0 runs on this machine without Dask: one process (this one) detects while N
        worker processes read and preprocess the next N scans (:func:`process_prefetched`).
    """
    from ..engine.settings import DetectionSettings

    t_start = time.perf_counter()
    sdict = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings or {})
    # validate once, here, not in 50,000 tasks
    DetectionSettings.from_dict({k: v for k, v in sdict.items() if k != "location"})
    scans = _prepared_scans(source, modality, scans)
    shash = settings_hash(sdict, process if isinstance(process, str) else repr(process))
    version = engine_version(process)  # no weights: ModelError now, not in every task
    out_root = Path(out_root).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_root)
    config = {"process": process, "settings": sdict, "settings_hash": shash,
              "engine_version": version, "threads": threads, "run_id": uuid.uuid4().hex}

    rows, todo = _split_done(scans, out_root, shash, version)
    bar = _ProgressBar(len(scans), len(rows)) if progress is True else None
    t_work = time.perf_counter()
    if todo and prefetch:
        config["threads"] = threads or _cpu_count()
        rows.update(process_prefetched(todo, out_root, config, prefetch, bar, progress))
    elif todo:
        rows.update(_process_on_dask(todo, len(rows), out_root, config, client, scheduler,
                                     workers, threads, retries, bar, progress))
    t_work = time.perf_counter() - t_work
    if bar:
        bar.finish()
    _remove_attempt_leftovers(out_root, config["run_id"])
    ordered = [rows[s.key] for s in scans]
    table = write_cohort_table(ordered, out_root / "cohort.csv")
    summary = throughput_summary(ordered, t_work, "prefetch" if prefetch else "dask")
    _write_json_atomic(out_root / "cohort_summary.json", summary)
    return CohortReport(ordered, str(table), time.perf_counter() - t_start, summary)


def throughput_summary(rows: list, wall_s: float, mode: str) -> dict:
    """Scans per minute over the processing wall time (start-up and skipped scans excluded) and
    each stage's seconds summed over the scans done in this run."""
    done = [r for r in rows if r["status"] == "done"]
    totals: dict = {}
    for r in done:
        for stage, sec in (r.get("timings_s") or {}).items():
            totals[stage] = totals.get(stage, 0.0) + float(sec)
    return {"mode": mode, "scans": len(rows), "done": len(done),
            "skipped": sum(r["status"] == "skipped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "wall_s": round(wall_s, 3),
            "scans_per_min": round(60.0 * len(done) / wall_s, 3) if done and wall_s > 0 else 0.0,
            "stage_totals_s": {k: round(v, 3) for k, v in totals.items()}}


def throughput_line(summary: dict) -> str:
    """One line for the terminal: scans/min and the stages that took the time."""
    stages = sorted(summary["stage_totals_s"].items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in stages)
    return (f"throughput: {summary['scans_per_min']:.2f} scans/min ({summary['done']} in "
            f"{summary['wall_s']:.1f} s, {summary['mode']})" + (f"; stage totals: {parts}"
                                                                 if parts else ""))


# ----------------------------------------------------------------------------- prefetch mode
def process_prefetched(todo: list, out_root: Path, config: dict, prefetch: int, bar=None,
                       progress=None) -> dict:
    """Rows of ``todo``: this process runs each scan's detection (e.g. on the one GPU) while a
    pool of ``prefetch`` processes reads and preprocesses the next ``prefetch`` scans.

    The queue is bounded (at most ``prefetch`` prepared scans wait in memory) and scans finish
    in order. Each scan goes through :func:`run_scan`, so outputs, records and failure rows are
    those of the Dask path; the process must have a ``prepare(path, modality, settings)``.
    """
    from collections import deque

    from ..workers import process_pool

    if not hasattr(resolve_process(config["process"]), "prepare"):
        raise InputError(f"process {config['process']!r} has no prepare(): it cannot prefetch")
    rows: dict = {}
    queue: deque = deque()
    pending = iter(todo)
    with process_pool(prefetch, initializer=_set_threads, initargs=(1,)) as pool:
        def top_up():
            for s in pending:
                queue.append((s, pool.submit(prepare_task, config["process"], s.path,
                                             s.modality, config["settings"])))
                if len(queue) >= prefetch:
                    return

        top_up()
        while queue:
            s, fut = queue.popleft()
            top_up()  # the next scans are read while this one is detected
            rows[s.key] = run_scan(s.as_dict(), str(out_root), config, prepared=fut.result())
            if bar:
                bar.update(rows[s.key]["status"])
            elif callable(progress):
                progress(len(rows), len(todo))
    return rows


def prepare_task(process: str, path: str, modality: str, settings: dict):
    """In a prefetch worker: the process's ``prepare``, or the exception it raised (re-raised by
    :func:`run_scan`, so a bad scan becomes the same failed row as on the Dask path)."""
    try:
        return resolve_process(process).prepare(path, modality, dict(settings))
    except Exception as exc:  # noqa: BLE001 - judged by run_scan, as on the Dask path
        return exc


def _submit_all(client, todo, out_root, config, retries, bar, progress) -> dict:
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = {}
    for s in todo:
        f = client.submit(run_scan, s.as_dict(), str(out_root), config, retries=retries,
                          key=f"cmb-scan-{s.key}-{token}", pure=False)
        futures[f] = s
    rows = {}
    done = 0
    try:
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, I/O: recorded, not fatal
                row = {"subject": s.subject, "session": s.session, "modality": s.modality,
                       "scan": s.key, "path": s.path, "status": "failed", "cmb_count": "",
                       "runtime_s": "", "model_version": "",
                       "reason": _one_line(f"{type(exc).__name__}: {exc}")}
            rows[s.key] = row
            done += 1
            if bar:
                bar.update(row["status"])
            elif callable(progress):
                progress(done, len(todo))
    except KeyboardInterrupt:
        client.cancel(list(futures))
        raise
    return rows


def _remove_stale(out_root: Path) -> None:
    """Leftovers of killed runs (hidden ``.X.tmp-*`` / ``.X.old-*`` folders) older than a day
    may go; younger ones may belong to a run still going on another machine."""
    now = time.time()
    for p in out_root.glob(".*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            try:
                if now - p.stat().st_mtime > 86400:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def write_cohort_table(rows: list, path) -> Path:
    """``cohort.csv``: one row per scan; category columns only when some scan has them."""
    path = Path(path)
    extra = sorted({k for r in rows for k in r if k.startswith("n_")},
                   key=lambda k: (CATEGORY_ORDER.index(k[2:]) if k[2:] in CATEGORY_ORDER
                                  else len(CATEGORY_ORDER), k))
    cols = COHORT_COLUMNS[:7] + extra + COHORT_COLUMNS[7:]
    tmp = path.with_name(f".{path.name}.part{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", restval="")
        w.writeheader()
        for r in rows:
            r = dict(r)
            if r["status"] in ("done", "skipped"):
                for k in extra:
                    r.setdefault(k, 0)
            w.writerow(r)
    os.replace(tmp, path)
    return path


class _ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, skipped: int = 0):
        self.total, self.n, self.failed, self.skipped = total, skipped, 0, skipped
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def update(self, status: str) -> None:
        self.n += 1
        self.failed += status == "failed"
        self.skipped += status == "skipped"
        self.draw()

    def draw(self, end: str = "") -> None:
        frac = self.n / max(1, self.total)
        decile = int(frac * 10)
        if not self.tty and not end and decile == self._last_decile:
            return
        self._last_decile = decile
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        el = time.perf_counter() - self.t0
        line = (f"[{bar}] {self.n}/{self.total} scans, {self.failed} failed, "
                f"{self.skipped} skipped, {el:.0f} s")
        print(("\r" if self.tty else "") + line, end=end if self.tty else "\n",
              file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            self.draw(end="\n")


# ------------------------------------------------------------------------------- benchmark
def benchmark(scans, workers=(1, 2), out_root=None, process: str = ENGINE_PROCESS,
              settings=None, cores: int | None = None) -> list:
    """Throughput (scans/min) of the same scans with each number of LocalCluster workers.

    Each run gets a fresh output folder and its own cluster; the clock runs from submitting the
    first scan to the last result (cluster start-up excluded, model loading included). Torch
    threads per worker = cores // workers. Also times one scan in this process with all cores
    (``single_scan_s``) for the README.
    """
    import tempfile

    from distributed import Client, LocalCluster

    scans = [s if isinstance(s, Scan) else Scan(str(s), _guess_modality(Path(s).name) or "swi")
             for s in scans]
    scans = _unique_keys([Scan(**s.as_dict()) for s in scans])
    sdict = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings or {})
    cores = cores or _cpu_count()
    root = Path(out_root or tempfile.mkdtemp(prefix="cmb-bench-"))
    results = []
    single_dir = root / "single"
    single_dir.mkdir(parents=True, exist_ok=True)
    func = resolve_process(process)
    t0 = time.perf_counter()
    func(scans[0].path, scans[0].modality, str(single_dir), scans[0].key, sdict, cores)
    single = time.perf_counter() - t0
    for n in workers:
        t = max(1, cores // n)
        env = {v: str(t) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, env=env, silence_logs=40) as cluster, \
                Client(cluster) as client:
            t1 = time.perf_counter()
            rep = run_cohort(None, root / f"workers{n}", settings=sdict, client=client,
                             process=process, threads=t, scans=scans, progress=False)
            wall = time.perf_counter() - t1
        ok = rep.count("done")
        results.append({"workers": n, "torch_threads": t, "scans": len(scans), "done": ok,
                        "wall_s": round(wall, 2),
                        "scans_per_min": round(60.0 * ok / wall, 3) if wall > 0 else math.nan,
                        "single_scan_s": round(single, 2)})
    return results


def cohort_cost(scans_per_min: float, n_scans: int = 50000, nodes: int = 1) -> dict:
    """Wall time for ``n_scans`` at a measured per-machine throughput on ``nodes`` machines.

    Assumes the nodes are like the benchmarked one and I/O keeps up (scaling is linear in
    nodes because scans are independent; the scheduler's per-task overhead, ~1 ms, is
    negligible against seconds per scan).
    """
    minutes = n_scans / (scans_per_min * nodes)
    return {"n_scans": n_scans, "nodes": nodes, "hours": round(minutes / 60.0, 2),
            "days": round(minutes / 1440.0, 2)}


# -------------------------------------------------------------------------------------- CLI
def configure_parser(parser) -> None:
    parser.add_argument("input", metavar="INPUT",
                        help="folder of scans, BIDS dataset, or CSV (path, modality[, subject]"
                             "[, session])")
    parser.add_argument("--output-dir", "-o", required=True, metavar="DIR",
                        help="per-scan output folders and cohort.csv go here")
    parser.add_argument("--modality", choices=MODALITIES,
                        help="modality of a folder's scans (default: from file names); "
                             "for BIDS: keep only this modality")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="address of a running Dask scheduler (tcp://host:8786); "
                             "default: a LocalCluster on this machine")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="LocalCluster worker processes (default: cores/2, memory "
                             "permitting; torch threads per worker = cores/N)")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch threads per worker (default: cores/workers; set this with "
                             "--scheduler to match your workers' cores)")
    parser.add_argument("--threshold", type=float, metavar="P",
                        help="student confidence a reported CMB needs, for every modality "
                             "(default: the bundled models' validated threshold for each "
                             "scan's modality)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-location", action="store_true",
                        help="skip MNI registration and the lobar/deep/infratentorial counts")
    parser.add_argument("--retries", type=int, default=2,
                        help="Dask retries of a scan after an infrastructure error")
    parser.add_argument("--process", default="engine", metavar="SPEC",
                        help="per-scan function: 'engine' (default), 'blobs' (weight-free "
                             "plumbing check) or package.module:function / file.py:function")
    parser.add_argument("--prefetch", type=int, default=0, metavar="N",
                        help="no Dask: this process detects (one GPU or all cores) while N "
                             "worker processes read and preprocess the next N scans")
    parser.add_argument("--benchmark", action="store_true",
                        help="instead of processing: time the first 8 scans with 1 and 2 "
                             "LocalCluster workers and print scans/min")


def _process_spec(name: str) -> str:
    return {"engine": ENGINE_PROCESS, "blobs": BLOB_PROCESS}.get(name, name)


def run_command(args) -> int:
    overrides: dict = {"device": args.device, "location": not args.no_location}
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    process = _process_spec(args.process)
    resolve_process(process)  # fail fast on a typo, before any cluster starts
    if args.benchmark:
        scans = discover(args.input, args.modality)[:8]
        res = benchmark(scans, out_root=Path(args.output_dir) / "benchmark", process=process,
                        settings=overrides)
        print(json.dumps(res, indent=2))
        return 0
    if args.prefetch and args.scheduler:
        raise InputError("--prefetch runs on this machine; it does not combine with --scheduler")
    rep = run_cohort(args.input, args.output_dir, modality=args.modality, settings=overrides,
                     scheduler=args.scheduler, workers=args.workers, process=process,
                     retries=args.retries, threads=args.threads, prefetch=max(0, args.prefetch))
    print(f"{rep.count('done')} done, {rep.count('skipped')} skipped (already complete), "
          f"{rep.count('failed')} failed in {rep.elapsed_s:.1f} s; table: {rep.table}")
    print(throughput_line(rep.summary))
    for r in rep.rows:
        if r["status"] == "failed":
            print(f"  failed: {r['scan']}: {r['reason']}", file=sys.stderr)
    return 1 if rep.count("failed") else 0
