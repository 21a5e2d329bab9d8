"""mask_at_cmbs.py SCANS: is each true CMB's centre (and how much of a 2 mm ball around it)
inside the engine's automatic brain mask on the working grid? Validation scans only."""
import json
import sys
from pathlib import Path

import numpy as np

from CMBDetectorLib.engine.detection import default_settings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.preprocessing import brain_mask, to_working_grid
from CMBDetectorLib.engine.volume import read_volume

scans = Path(sys.argv[1])
settings = default_settings(load_bundle("CMBDetector/Resources/Models", device="cpu"))
sp = float(settings.working_spacing_mm)
out = []
for t in sorted(scans.glob("sub-*_truth.json")):
    truth = json.loads(t.read_text())
    stem = t.name[:-len("_truth.json")]
    for m in ("gre", "swi", "qsm"):
        work = to_working_grid(read_volume(scans / f"{stem}_{m}.nii.gz"), sp)
        bm = brain_mask(work.array, sp, m, float(settings.mask_closing_mm), settings.mask_threshold)
        ras2ijk = np.linalg.inv(work.ijk_to_ras)
        for c in truth["cmbs"]:
            ijk = ras2ijk @ np.r_[c["centre_ras"], 1.0]
            kji = np.round(ijk[:3][::-1]).astype(int)
            ok = all(0 <= kji[i] < bm.shape[i] for i in range(3))
            inside = bool(bm[tuple(kji)]) if ok else False
            lo = np.maximum(kji - 2, 0); hi = kji + 3
            frac = float(bm[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].mean())
            out.append(dict(stem=stem, mod=m, touches=c["touches"], vis=c.get(f"{m}_visible_diameter_mm", c["visible_diameter_mm"]), inside=inside, frac=round(frac, 2)))
json.dump(out, sys.stdout, indent=0)
