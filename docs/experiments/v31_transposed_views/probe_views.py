"""probe_views.py PRED SCANS OUT: re-score every stored candidate of PRED (detection.json files
of the bundled models on the simulated SCANS) over the eight mirror images and over sixteen
views (the mirrors and their in-plane transposes); write OUT/ with the sixteen-view
confidences (the other outputs linked). Run from the repository root."""
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import _preprocess, default_settings  # noqa: E402
from CMBDetectorLib.engine.inference import MIRRORS, _student_probabilities, extract_patches  # noqa: E402
from CMBDetectorLib.engine.models import load_bundle  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402

pred, scans, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
models = load_bundle("CMBDetector/Resources/Models", device="cpu")
settings = default_settings(models)
patch = int(models.manifest.get("patch_size", 24))
worst = 0.0
files = sorted(pred.glob("*_detection.json"))
for n, f in enumerate(files):
    stem = f.name[:-len("_detection.json")]
    for other in pred.glob(f"{stem}*"):
        if other.name != f.name and not (out / other.name).exists():
            os.symlink(other.resolve(), out / other.name)
    d = json.loads(f.read_text())
    cands = d["candidates"]
    if cands:
        vol = read_volume(scans / f"{stem}.nii.gz")
        prep, ch = _preprocess(vol, d["modality"], None, settings)
        ras = np.array([c["centroid_ras"] for c in cands], float)
        kji = prep.grid.ras_to_ijk_points(ras)[:, ::-1]
        x = extract_patches(ch, kji, patch)
        p8 = _student_probabilities(models.student, x, 64, MIRRORS)
        pt = _student_probabilities(models.student, np.ascontiguousarray(x.swapaxes(3, 4)),
                                    64, MIRRORS)
        stored = np.array([c["confidence"] for c in cands])
        worst = max(worst, float(np.abs(p8 - stored).max()))
        for c, a, b in zip(cands, p8, pt):
            c["confidence_8"] = float(a)
            c["confidence"] = float((a + b) / 2)
    (out / f.name).write_text(json.dumps(d))
    print(f"{n + 1}/{len(files)} {stem} max |8-view - stored| so far {worst:.2e}",
          file=sys.stderr, flush=True)
print(f"largest difference of the 8-view re-score to the stored confidence: {worst:.2e}")
