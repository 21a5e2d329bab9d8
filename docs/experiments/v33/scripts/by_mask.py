"""by_mask.py PERCMB.json: SWI CMBs >= 4 mm visible found / with a candidate, by the subject's SWI
phase-mask type (drawn as the simulator draws it). Validation scans only."""
import json, sys
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.simulation.appearance import family_rng, SWI_MASKS

def mask_of(stem):
    r = family_rng(int(stem.split("-")[1]), "swi_mask")
    return SWI_MASKS[int(r.choice(3, p=[0.6, 0.2, 0.2]))]

rows = [r for r in json.load(open(sys.argv[1])) if r["mod"] == "swi" and r["vis"] >= 4]
out = {}
for r in rows:
    m = mask_of(r["stem"])
    o = out.setdefault(m, [0, 0, 0])
    o[0] += bool(r.get("found")); o[1] += r["cand"] is not None; o[2] += 1
print({m: f"found {a} / candidate {b} / all {c}" for m, (a, b, c) in sorted(out.items())})
