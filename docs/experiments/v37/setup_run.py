"""setup_run.py: make runs/v37 from runs/v32 without simulating again what does not change.

v37 differs from v32 only in how a simulated mIP SWI is prepared (``reverse_projection``).
Every case whose scan is no mIP SWI, and the held-out NIfTI scans, are hard-linked from
runs/v32 (same data version, same seeds); the mIP SWI cases of the discriminator and
validation splits are left out, so the data phase simulates their subjects again and
prepares them reversed. Pool A (the detector's subjects) keeps v32's cases: v37 reuses v32's
detector as it is (``detector_weights``), and that detector was trained on them.
Run from the repository root, then: cmbdetector train --run-dir runs/v37 --config
docs/experiments/v37/config.json --jobs 2 --export runs/v37/models"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.training.train import Run, TrainConfig  # noqa: E402

src, dst = Path("runs/v32"), Path("runs/v37")
cfg = TrainConfig()  # as `cmbdetector train --config` builds it (seed 2023)
for key, value in json.loads(Path("docs/experiments/v37/config.json").read_text()).items():
    setattr(cfg, key, tuple(value) if isinstance(getattr(cfg, key), tuple) else value)
run = Run(dst, cfg)
(dst / "cases").mkdir(parents=True, exist_ok=True)
left_out = []
for f in sorted((src / "cases").glob("sub-*.npz")):
    seed = int(f.name.split("-")[1].split("_")[0])
    split = next(sp for sp, seeds in run.seeds.items() if seed in seeds)
    if (split != "pool_a" and f.name.endswith("_swi.npz")
            and int(run.swi_processing(f.stem).get("mip", 0)) > 1):
        left_out.append(f.name)
        continue
    if not (dst / "cases" / f.name).exists():
        os.link(f, dst / "cases" / f.name)
for folder in ("test_scans", "cross_domain_scans"):
    (dst / folder).mkdir(exist_ok=True)
    for f in (src / folder).iterdir():
        if not (dst / folder / f.name).exists():
            os.link(f, dst / folder / f.name)
print(f"{len(left_out)} mIP SWI cases to prepare again: {' '.join(left_out)}")
