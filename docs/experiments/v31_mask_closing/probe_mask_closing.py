import json, sys
import numpy as np
from dataclasses import replace
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.volume import read_volume
from CMBDetectorLib.engine.detection import _preprocess
from CMBDetectorLib.engine.settings import DetectionSettings
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.inference import predict_volume
models = load_bundle("CMBDetector/Resources/Models", device="cpu")
inf = models.manifest["inference"]
base = DetectionSettings(mask_threshold="log", normalisation="iqr", frst_radii_mm=tuple(inf["frst_radii_mm"]))
for stem in sys.argv[1:]:
    vol = read_volume(f"runs/valsel25/{stem}_swi.nii.gz")
    truth = json.load(open(f"runs/valsel25/{stem}_truth.json"))
    res = {}
    for cl in (0.0, 3.0):
        s = replace(base, mask_closing_mm=cl)
        prep, ch = _preprocess(vol, "swi", None, s)
        prob = predict_volume(models.detector, ch, s.tile_size, s.tile_overlap)
        res[cl] = (prep, prob)
    for c in truth["cmbs"]:
        vis = c.get("swi_visible_diameter_mm", c["visible_diameter_mm"])
        if vis < 2: continue
        out = []
        for name, (prep, prob) in res.items():
            k = np.rint(prep.grid.ras_to_ijk_points(np.array([c["centre_ras"]]))[0][::-1]).astype(int)
            sl = tuple(slice(max(0, a-2), a+3) for a in k)
            out.append(f"closing {name}: inmask {int(prep.mask[tuple(k)])} p {prob[sl].max():.3f}")
        print(stem, round(vis, 1), c.get("touches"), " | ".join(out))
    print(stem, "mask voxels", {k: int(v[0].mask.sum()) for k, v in res.items()}, "prob>0.05 voxels", {k: int(((v[1] > 0.05) & v[0].mask).sum()) for k, v in res.items()})
