"""probe_mask.py SUBJECT [...]: the shipped detector's probability at each visible SWI CMB of the
selection scans (runs/valsel25), with the automatic brain mask, the automatic mask closed by
3 mm (``mask_closing_mm``), and the simulator's true brain mask."""
import json
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import _preprocess, default_settings
from CMBDetectorLib.engine.inference import predict_volume
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.volume import read_volume

models = load_bundle("CMBDetector/Resources/Models", device="cpu")
base = default_settings(models)
for stem in sys.argv[1:]:
    vol = read_volume(f"runs/valsel25/{stem}_swi.nii.gz")
    true_mask = read_volume(f"runs/valsel25/{stem}_brainmask.nii.gz")
    truth = json.load(open(f"runs/valsel25/{stem}_truth.json"))
    variants = {"automatic": (base, None), "closed 3 mm": (replace(base, mask_closing_mm=3.0), None),
                "true": (base, true_mask)}
    res = {}
    for name, (s, mask) in variants.items():
        prep, ch = _preprocess(vol, "swi", mask, s)
        res[name] = (prep, predict_volume(models.detector, ch, s.tile_size, s.tile_overlap))
    for c in truth["cmbs"]:
        vis = c.get("swi_visible_diameter_mm", c["visible_diameter_mm"])
        if vis < 2:
            continue
        out = []
        for name, (prep, prob) in res.items():
            k = np.rint(prep.grid.ras_to_ijk_points(np.array([c["centre_ras"]]))[0][::-1])
            sl = tuple(slice(max(0, int(a) - 2), int(a) + 3) for a in k)
            out.append(f"{name}: in mask {int(prep.mask[tuple(k.astype(int))])} "
                       f"p {prob[sl].max():.3f}")
        print(stem, round(vis, 1), c.get("touches"), " | ".join(out))
