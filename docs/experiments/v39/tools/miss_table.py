"""miss_table.py MOD SCANS_DIR PRED_DIR... : per true CMB of MOD scans, the stage where it is
lost (no candidate / student below threshold / clean-up), with SWI variant, anatomy, size and
what it touches (v38's tool with the scans folder as an argument)."""
import json, sys, glob, os
from collections import Counter, defaultdict
import numpy as np
mod, scans_dir = sys.argv[1], sys.argv[2]
scans = {os.path.basename(f)[:11]: f for f in glob.glob(f"{scans_dir}/sub-*_truth.json")}
rows = []
for pd in sys.argv[3:]:
    for f in sorted(glob.glob(f"{pd}/sub-*_{mod}_detection.json")):
        sub = os.path.basename(f)[:11]
        d = json.load(open(f)); t = json.load(open(scans[sub]))
        thr = d["threshold"]
        C = d["candidates"]
        cr = np.array([c["centroid_ras"] for c in C]).reshape(-1, 3)
        app = t["params"]["appearance"]
        var = (app["swi"]["mask"] + ("+mip" if app["swi"].get("mip") else "")) if mod == "swi" else (app["qsm"]["recon"] if mod == "qsm" else "gre")
        for c in t["cmbs"]:
            vis = c.get(f"{mod}_visible_diameter_mm", c.get("visible_diameter_mm"))
            p = np.array(c["centre_ras"])
            dist = np.linalg.norm(cr - p, axis=1) if len(cr) else np.array([])
            near = [C[i] for i in np.where(dist < 5.0)[0]]
            if any(n["kept"] and n["confidence"] >= thr for n in near): stage = "found"
            elif not near: stage = "no candidate"
            elif any(n["confidence"] >= thr for n in near): stage = "clean-up:" + ",".join(sorted({n["reason"] for n in near if n["confidence"] >= thr}))
            else: stage = "student"
            best = max([n["confidence"] for n in near], default=-1)
            bestp = max([n["candidate_probability"] for n in near], default=-1)
            rows.append(dict(sub=sub, var=var, vis=vis, stage=stage, conf=best, cprob=bestp,
                             touches=c.get("touches"), cat=c.get("category"), anat=t["params"].get("anatomy", "mni152")))
vis = [r for r in rows if r["vis"] and r["vis"] >= 2]
print(f"{mod}: {len(rows)} CMBs, {len(vis)} visible >= 2 mm")
print("stage (visible):", Counter(r["stage"] for r in vis).most_common())
for key in ("var", "anat", "touches", "cat"):
    tab = defaultdict(Counter)
    for r in vis: tab[r[key]][r["stage"] == "found"] += 1
    print(key, {k: f"{v[True]}/{v[True]+v[False]}" for k, v in sorted(tab.items())})
big = [r for r in vis if r["vis"] >= 4]
print("visible >= 4 mm:", Counter(r["stage"] for r in big).most_common())
tab = defaultdict(Counter)
for r in big: tab[r["var"]][r["stage"]] += 1
print("  by variant:", {k: dict(v) for k, v in tab.items()})
tab = defaultdict(Counter)
for r in vis: tab[(r["anat"], r["touches"])][r["stage"] == "found"] += 1
print("anatomy x touches", {f"{a}/{t}": f"{v[True]}/{v[True]+v[False]}" for (a, t), v in sorted(tab.items())})
