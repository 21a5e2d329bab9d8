"""per_cmb.py PRED SCANS [MOD]: every true CMB with its nearest candidate (< 5 mm): candidate
probability, student confidence, kept / reason. Validation scans only."""
import json
import sys
from pathlib import Path

import numpy as np

pred, scans = Path(sys.argv[1]), Path(sys.argv[2])
mods = sys.argv[3:] or ["gre", "swi", "qsm"]
rows = []
for t in sorted(scans.glob("sub-*_truth.json")):
    truth = json.loads(t.read_text())
    stem = t.name[:-len("_truth.json")]
    for m in mods:
        f = pred / f"{stem}_{m}_detection.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        cands = d["candidates"]
        thr = d["threshold"]
        c_xyz = np.array([c["centroid_ras"] for c in cands]) if cands else np.zeros((0, 3))
        for c in truth["cmbs"]:
            vis = c.get(f"{m}_visible_diameter_mm", c["visible_diameter_mm"])
            row = dict(stem=stem, mod=m, vis=vis, touches=c.get("touches"), cand=None)
            if len(c_xyz):
                dist = np.linalg.norm(c_xyz - np.array(c["centre_ras"]), axis=1)
                i = int(dist.argmin())
                if dist[i] < 5:
                    k = cands[i]
                    row.update(cand=round(k["candidate_probability"], 3),
                               conf=round(k["confidence"], 3), kept=k["kept"],
                               reason=k["reason"], vol=round(k["volume_mm3"], 1),
                               dist=round(float(dist[i]), 2), found=k["kept"] and k["confidence"] >= thr)
            rows.append(row)
json.dump(rows, sys.stdout, indent=0)
