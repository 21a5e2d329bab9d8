"""Visible CMBs (>= 2 mm) of the selection scans whose centre lies outside the engine's brain mask."""
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.engine.detection import prepare_file, default_settings
from CMBDetectorLib.engine.models import read_manifest
scans = Path("runs/valsel25")
s = default_settings(read_manifest()["inference"])
found = {(r["stem"], r["mod"], round(r["vis"], 2)): r.get("found") for r in json.load(open("runs/rank/v31_percmb.json"))}
out = []
for t in sorted(scans.glob("sub-*_truth.json")):
    stem = t.name[:11]; truth = json.loads(t.read_text())
    for m in ("gre", "swi", "qsm"):
        p = prepare_file(scans / f"{stem}_{m}.nii.gz", m, settings=s)
        for c in truth["cmbs"]:
            vis = c.get(f"{m}_visible_diameter_mm", c["visible_diameter_mm"])
            if vis < 2:
                continue
            k, j, i = np.rint(p.prep.grid.ras_to_ijk_points(np.array([c["centre_ras"]]))[0][::-1]).astype(int)
            inside = bool(p.prep.mask[k, j, i])
            cube = p.prep.mask[k-2:k+3, j-2:j+3, i-2:i+3].mean()
            out.append(dict(stem=stem, mod=m, vis=round(vis, 1), touches=c.get("touches"), inside=inside,
                            cube=round(float(cube), 2), found=found.get((stem, m, round(vis, 2)))))
json.dump(out, open("runs/csf/mask_out.json", "w"), indent=0)
for m in ("gre", "swi", "qsm"):
    rows = [r for r in out if r["mod"] == m]
    outside = [r for r in rows if not r["inside"]]
    print(m, "visible", len(rows), "centre outside mask", len(outside), [ (r["stem"], r["vis"], r["touches"], r["cube"], r["found"]) for r in outside])
