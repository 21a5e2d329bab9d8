"""``cmbdetector bench``: wall time per stage and peak memory on this machine.

Each case runs in a fresh subprocess so its peak RSS is its own. Cases: a 512x512x72 scan at
0.45x0.45x2 mm (the issue's target: <= 20 s, <= 3 GB on 2 CPU cores) and a 256x256x160 1 mm
scan, both simulated whole brains resampled onto exactly that grid; plus the radial symmetry
transform against its per-voxel loop on the same sub-volume, and the location step.

Peak memory is reported per stage too (:class:`StageMeter`): the process RSS, because numpy and
torch allocate outside Python's allocator (tracemalloc would miss them), and CUDA's own peak
when the networks run there.
"""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import threading
import time

import numpy as np

CASES = {"512x512x72 @ 0.45x0.45x2 mm": ((512, 512, 72), (0.45, 0.45, 2.0)),
         "256x256x160 @ 1 mm": ((256, 256, 160), (1.0, 1.0, 1.0))}


def bench_volume(shape_ijk, spacing, seed: int = 99, modality: str = "swi"):
    """A simulated whole brain on exactly the requested grid (centred, axis-aligned)."""
    from ..simulation.simulator import SimulationConfig, simulate_subject
    from ..engine.volume import Volume, resample

    subj = simulate_subject(seed, SimulationConfig(spacing_mm=tuple(spacing), n_cmbs=6,
                                                   oblique_deg=0.0, flip_axes=False))
    src = subj.images[modality]
    centre = src.ijk_to_ras_points([(np.array(src.shape_ijk) - 1) / 2])[0]
    origin = centre - (np.array(shape_ijk) - 1) / 2 * np.array(spacing)
    ref = Volume.from_arrays(np.zeros(shape_ijk[::-1], np.uint8), spacing, origin)
    out = resample(src, None, "linear", reference=ref)
    out.name = f"bench_{'x'.join(map(str, shape_ijk))}"
    return out


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the lifetime peak stands in)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return _hwm_bytes()


def _hwm_bytes() -> int:
    """The kernel's RSS high-water mark of this process (ru_maxrss is in kB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class StageMeter:
    """Peak RSS (and CUDA memory) per stage, driven by ``detect()``'s progress hook.

    A background thread samples the RSS every ``interval_s``; a stage that raises the kernel's
    high-water mark gets that exact value instead, so short spikes in the largest stages are
    not missed. ``peaks_gb[stage]`` and ``cuda_peaks_gb[stage]`` are absolute process peaks.
    """

    def __init__(self, interval_s: float = 0.005, cuda: bool = False):
        self.interval_s, self.cuda = interval_s, cuda
        self.peaks_gb: dict = {}
        self.cuda_peaks_gb: dict = {}
        self._stage, self._max, self._hwm0 = None, 0, 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> StageMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.switch(None)
        self._stop.set()
        self._thread.join()

    def progress(self, stage: str, fraction: float = 0.0) -> None:
        """``detect(progress=meter.progress)``: a new stage name closes the previous stage."""
        stage = None if stage == "done" else stage
        if stage != self._stage:
            self.switch(stage)

    def switch(self, stage: str | None) -> None:
        """Close the current stage (record its peaks) and open ``stage``."""
        rss, hwm = _rss_bytes(), _hwm_bytes()
        with self._lock:
            if self._stage is not None:
                peak = max(self._max, rss, hwm if hwm > self._hwm0 else 0)
                self._record(self.peaks_gb, self._stage, peak)
                if self.cuda:
                    self._record(self.cuda_peaks_gb, self._stage, _cuda_peak_bytes())
            self._stage, self._max, self._hwm0 = stage, rss, hwm
        if self.cuda and stage is not None:
            import torch

            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _record(table: dict, stage: str, peak_bytes: int) -> None:
        table[stage] = max(table.get(stage, 0.0), round(peak_bytes / 1e9, 3))

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            with self._lock:
                self._max = max(self._max, rss)


def _cuda_peak_bytes() -> int:
    import torch

    return int(torch.cuda.max_memory_allocated())


def cuda_missing() -> str:
    """Why ``--device cuda`` cannot run here ("" when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return ""


def _run_case(name: str, device: str) -> dict:
    from ..engine.detection import default_settings, detect
    from ..engine.models import load_bundle

    shape, spacing = CASES[name]
    vol = bench_volume(shape, spacing)
    with StageMeter(cuda=device != "cpu" and not cuda_missing()) as meter:
        meter.switch("loading models")
        t0 = time.perf_counter()
        models = load_bundle(device=device)
        t_load = time.perf_counter() - t0
        settings = default_settings(models, device=device)
        t0 = time.perf_counter()
        res = detect(vol, "swi", settings=settings, models=models, progress=meter.progress)
        wall = time.perf_counter() - t0
    timings = dict(res.timings)
    timings["loading models"] = t_load
    out = {"case": name, "wall_s": round(wall + t_load, 2), "detect_s": round(wall, 2),
           "stages_s": {k: round(v, 2) for k, v in timings.items()},
           "stages_peak_rss_gb": meter.peaks_gb,
           "lesions": len(res.lesions()), "candidates": len(res.candidates),
           "device": res.device,
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    if meter.cuda:
        out["stages_peak_cuda_gb"] = meter.cuda_peaks_gb
    return out


def cli_wall(case: str, device: str = "cpu", repeats: int = 2) -> dict:
    """What a user waits for: ``cmbdetector detect`` on the case written as a NIfTI file, in
    a fresh interpreter (start-up, imports, reading, detection and writing the outputs), the
    best of ``repeats`` runs."""
    import os
    import tempfile

    from ..engine.volume import write_volume

    shape, spacing = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        scan = os.path.join(tmp, "scan.nii.gz")
        write_volume(bench_volume(shape, spacing), scan)
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", "detect", scan,
                                "--modality", "swi", "--device", device, "--quiet",
                                "--output-dir", os.path.join(tmp, "out")],
                               capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if r.returncode:
                return {"case": case, "error": r.stderr.strip().splitlines()[-1]}
    return {"case": case, "wall_s": round(min(walls), 2), "runs_s": [round(w, 2) for w in walls]}


def frst_speedup(size: int = 48) -> dict:
    """Vectorised FRST vs the per-voxel loop on the same normalised brain sub-volume."""
    from ..engine.preprocessing import prepare
    from ..engine.radial_symmetry import frst, frst_loop
    from ..engine.settings import DetectionSettings

    vol = bench_volume((160, 192, 160), (1.0, 1.0, 1.0))
    img = prepare(vol, "swi", None, DetectionSettings()).image
    c = np.array(img.shape) // 2
    sub = np.ascontiguousarray(img[c[0] - size // 2:c[0] + size // 2,
                                   c[1] - size // 2:c[1] + size // 2,
                                   c[2] - size // 2:c[2] + size // 2])
    t0 = time.perf_counter()
    frst(sub)
    tv = time.perf_counter() - t0
    t0 = time.perf_counter()
    frst_loop(sub)
    tl = time.perf_counter() - t0
    t0 = time.perf_counter()
    frst(img)
    tfull = time.perf_counter() - t0
    return {"subvolume": f"{size}^3", "vectorised_s": round(tv, 4), "loop_s": round(tl, 2),
            "speedup": round(tl / tv, 1), "whole_brain_vectorised_s": round(tfull, 2),
            "whole_brain_shape": list(img.shape)}


def configure_parser(p) -> None:
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--case", choices=list(CASES), help="one case only (internal)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--skip-location", action="store_true")


def run_command(args) -> int:
    if args.device == "cuda" and cuda_missing():
        print(f"cmbdetector bench: skipped: --device cuda, but {cuda_missing()}", file=sys.stderr)
        return 0
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(_run_case(args.case, args.device)))
        return 0
    results = {"machine": {"cpus": __import__("os").cpu_count(), "python": sys.version.split()[0],
                           "platform": platform.platform()}, "detection": []}
    for name in CASES:
        r = subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", "bench", "--case", name,
                            "--device", args.device], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        results["detection"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    results["cli"] = cli_wall(next(iter(CASES)), args.device)
    results["frst"] = frst_speedup()
    if not args.skip_location:
        try:
            from ..location.locate import benchmark as loc_bench
            results["location"] = loc_bench()
        except Exception as exc:  # location is optional (atlas package)
            results["location"] = {"error": str(exc).splitlines()[0]}
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def format_table(results: dict) -> str:
    lines = ["| case | wall s | load | preprocess | candidates | student | clean-up | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["detection"]:
        s = r["stages_s"]
        lines.append(f"| {r['case']} | {r['wall_s']} | {s.get('loading models', 0)} | "
                     f"{s.get('preprocessing', 0)} | {s.get('candidate detection', 0)} | "
                     f"{s.get('discrimination', 0)} | {s.get('clean-up', 0)} | "
                     f"{r['peak_rss_gb']} |")
    lines += [""] + memory_table(results["detection"])
    c = results.get("cli")
    if c:
        lines += ["", f"`cmbdetector detect` on the {c['case']} scan, fresh process (start-up, "
                      f"reading, detection, outputs): "
                  + (f"{c['wall_s']} s (runs: {c['runs_s']})" if "wall_s" in c
                     else f"failed: {c['error']}")]
    f = results["frst"]
    lines.append("")
    lines.append(f"FRST on a {f['subvolume']} brain sub-volume: vectorised {f['vectorised_s']} s, "
                 f"per-voxel loop {f['loop_s']} s -> {f['speedup']}x; whole brain "
                 f"{f['whole_brain_shape']} in {f['whole_brain_vectorised_s']} s")
    if "location" in results:
        lines.append(f"location: {json.dumps(results['location'])}")
    return "\n".join(lines)


STAGE_COLUMNS = (("loading models", "load"), ("preprocessing", "preprocess"),
                 ("candidate detection", "candidates"), ("discrimination", "student"),
                 ("clean-up", "clean-up"))


def memory_table(detection: list) -> list:
    """Markdown rows: peak RSS (and CUDA memory, when used) in GB at each stage of each case."""
    lines = ["| case | memory GB | " + " | ".join(c for _, c in STAGE_COLUMNS) + " |",
             "|---|---|" + "---|" * len(STAGE_COLUMNS)]
    for r in detection:
        for key, what in (("stages_peak_rss_gb", "peak RSS"), ("stages_peak_cuda_gb", "CUDA")):
            if key in r:
                vals = " | ".join(str(r[key].get(stage, "")) for stage, _ in STAGE_COLUMNS)
                lines.append(f"| {r['case']} | {what} | {vals} |")
    return lines
