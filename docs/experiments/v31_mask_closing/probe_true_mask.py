import json, sys
import numpy as np
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.volume import read_volume
from CMBDetectorLib.engine.detection import _preprocess, extract_candidates
from CMBDetectorLib.engine.settings import DetectionSettings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.inference import predict_volume
models = load_bundle("CMBDetector/Resources/Models", device="cpu")
for stem in ("sub-3100212", "sub-3100214", "sub-3100211", "sub-3100213"):
    vol = read_volume(f"runs/valsel25/{stem}_swi.nii.gz")
    bm = read_volume(f"runs/valsel25/{stem}_brainmask.nii.gz")
    truth = json.load(open(f"runs/valsel25/{stem}_truth.json"))
    s = DetectionSettings()
    res = {}
    for name, mask in (("auto", None), ("true", bm)):
        prep, ch = _preprocess(vol, "swi", mask, s)
        prob = predict_volume(models.detector, ch, s.tile_size, s.tile_overlap)
        res[name] = (prep, prob)
    for c in truth["cmbs"]:
        vis = c.get("swi_visible_diameter_mm", c["visible_diameter_mm"])
        if vis < 2: continue
        out = []
        for name, (prep, prob) in res.items():
            k = np.rint(prep.grid.ras_to_ijk_points(np.array([c["centre_ras"]]))[0][::-1]).astype(int)
            sl = tuple(slice(max(0, a-2), a+3) for a in k)
            out.append(f"{name}: inmask {int(prep.mask[tuple(k)])} p {prob[sl].max():.3f}")
        print(stem, round(vis, 1), c.get("touches"), " | ".join(out))
