"""coarse_score.py: score candidates of large SWI CMBs with the v31 student on the 1 mm working
grid (as shipped) and on a 2 mm grid (FRST radii doubled), i.e. twice the context in the same
24-voxel patch. Validation scans only. Args: triples of (scan, detection json, truth json)."""
import json
import sys
from dataclasses import replace

import numpy as np

from CMBDetectorLib.engine.detection import default_settings
from CMBDetectorLib.engine.inference import score_candidates
from CMBDetectorLib.engine.models import load_bundle
from CMBDetectorLib.engine.preprocessing import prepare
from CMBDetectorLib.engine.volume import read_volume

bundle = load_bundle("CMBDetector/Resources/Models", device="cpu")
base = default_settings(bundle)
args = sys.argv[1:]
for scan, det, tru in zip(args[::3], args[1::3], args[2::3]):
    d = json.load(open(det))
    cmbs = json.load(open(tru))["cmbs"]
    big = [c for c in d["candidates"] if c["volume_mm3"] >= 40]
    if not big:
        continue
    ras = np.array([c["centroid_ras"] for c in big])
    vol = read_volume(scan)
    out = {}
    for f in (1.0, 2.0):
        s = replace(base, working_spacing_mm=base.working_spacing_mm * f,
                    frst_radii_mm=tuple(r * f for r in base.frst_radii_mm))
        p = prepare(vol, "swi", None, s)
        kji = p.grid.ras_to_ijk_points(ras)[:, ::-1]
        out[f] = score_candidates(bundle.student, np.stack([p.image, p.frst]), kji, 24)
    for c, a, b in zip(big, out[1.0], out[2.0]):
        dist = [np.linalg.norm(np.subtract(t["centre_ras"], c["centroid_ras"])) for t in cmbs]
        j = int(np.argmin(dist)) if dist else -1
        vis = cmbs[j].get("swi_visible_diameter_mm", 0) if j >= 0 and dist[j] < 5 else 0
        print(json.dumps(dict(scan=scan, vol=c["volume_mm3"], shipped=c["confidence"],
                              s1=float(a), s2=float(b), cmb_vis=vis)))
