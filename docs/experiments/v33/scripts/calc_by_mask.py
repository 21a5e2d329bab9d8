"""calc_by_mask.py PRED SCANS: classifier confidence of SWI candidates within 3 mm of a calcification,
and of CMBs >= 4 mm, by the subject's SWI phase-mask sign (validation scans only)."""
import json, sys
from pathlib import Path
import numpy as np
pred, scans = Path(sys.argv[1]), Path(sys.argv[2])
mod = sys.argv[3] if len(sys.argv) > 3 else "swi"
out = {}
for t in sorted(scans.glob("sub-*_truth.json")):
    truth = json.loads(t.read_text()); stem = t.name[:11]
    mask = truth["params"]["appearance"]["swi"]["mask"]
    d = json.loads((pred / f"{stem}_{mod}_detection.json").read_text())
    cands = d["candidates"]
    if not cands:
        continue
    xyz = np.array([c["centroid_ras"] for c in cands])
    for m in truth["mimics"]:
        if m["type"] != "calcification":
            continue
        dist = np.linalg.norm(xyz - np.array(m["centre_ras"]), axis=1)
        i = int(dist.argmin())
        conf = round(cands[i]["confidence"], 2) if dist[i] < 3 else None
        out.setdefault(mask, {"calc": [], "cmb4": []})["calc"].append(conf)
    for c in truth["cmbs"]:
        if c.get(f"{mod}_visible_diameter_mm", 0) < 4:
            continue
        dist = np.linalg.norm(xyz - np.array(c["centre_ras"]), axis=1)
        i = int(dist.argmin())
        out.setdefault(mask, {"calc": [], "cmb4": []})["cmb4"].append(
            round(cands[i]["confidence"], 2) if dist[i] < 3 else None)
for k, v in sorted(out.items()):
    print(mod, k, "calcification candidates:", v["calc"], "| CMBs >= 4 mm:", v["cmb4"])
