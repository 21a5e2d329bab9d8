"""rebuild_run.py: make runs/v37 (weights, operating point, exported bundle) from the committed
files, for a machine whose runs/ is gone.

v37's trained networks are in docs/experiments/v37 (teacher, student, student_nokd) and its
detector is v32's (docs/experiments/v32/detector.pt); its operating point was chosen on its
validation subjects and is committed beside them. Nothing is trained or chosen here: the files
are put where ``Run`` reads them and ``Run.export`` writes the bundle to runs/v37/models. The
held-out scans are simulated by the evaluate phase from their seeds:
cmbdetector train --run-dir runs/v37 --config docs/experiments/v37/config.json --phases evaluate
--export runs/v37/models --jobs 2
Run from the repository root."""
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.training.train import Run, TrainConfig  # noqa: E402

src, dst = Path("docs/experiments/v37"), Path("runs/v37")
cfg = TrainConfig()  # as `cmbdetector train --config` builds it (seed 2023)
for key, value in json.loads((src / "config.json").read_text()).items():
    setattr(cfg, key, tuple(value) if isinstance(getattr(cfg, key), tuple) else value)
run = Run(dst, cfg)
files = {"detector": Path(cfg.detector_weights)}
files.update({n: src / f"{n}.pt" for n in ("teacher", "student", "student_nokd")})
for name, f in files.items():
    shutil.copyfile(f, run.path("weights", f"{name}.pt"))
shutil.copyfile(src / "operating_point.json", run.path("operating_point.json"))
for f in (src / "logs").glob("*.json"):
    shutil.copyfile(f, run.path("logs", f.name))
out = run.export(dst / "models")
for f in sorted(out.glob("*.pt")):
    print(f.name, hashlib.sha256(f.read_bytes()).hexdigest()[:16])
