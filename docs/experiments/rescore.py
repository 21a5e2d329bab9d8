"""Re-score stored candidates with another classifier, without the detector.

``rescore(bundle_dir, pred, scans, out, score)``: for every ``*_detection.json`` of ``pred``
(made by ``bundle_dir``'s models on the simulated ``scans``), preprocess the scan as
``detect()`` does, cut each stored candidate's patch and set its confidence to
``score(patches)``; write the files to ``out`` (the other outputs linked) so that
``cmbdetector evaluate`` scores them. ``score`` may return ``(new, extra)`` where ``extra``
is stored as ``confidence_extra``. Returns the largest difference between the stored
confidences and ``reference(patches)`` when one is given (the reproduction check)."""
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import _preprocess, default_settings  # noqa: E402
from CMBDetectorLib.engine.inference import extract_patches  # noqa: E402
from CMBDetectorLib.engine.models import load_bundle  # noqa: E402
from CMBDetectorLib.engine.volume import read_volume  # noqa: E402


def rescore(bundle_dir, pred, scans, out, score, reference=None) -> float:
    pred, scans, out = Path(pred), Path(scans), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = load_bundle(bundle_dir, device="cpu")
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
            x = extract_patches(ch, prep.grid.ras_to_ijk_points(ras)[:, ::-1], patch)
            if reference is not None:
                stored = np.array([c["confidence"] for c in cands])
                worst = max(worst, float(np.abs(reference(models, x) - stored).max()))
            new = score(models, x)
            extra = None
            if isinstance(new, tuple):
                new, extra = new
            for i, c in enumerate(cands):
                c["confidence"] = float(new[i])
                if extra is not None:
                    c["confidence_extra"] = float(extra[i])
        (out / f.name).write_text(json.dumps(d))
        print(f"{n + 1}/{len(files)} {stem} max |reproduced - stored| so far {worst:.2e}",
              file=sys.stderr, flush=True)
    return worst
