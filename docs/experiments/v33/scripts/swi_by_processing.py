"""swi_by_processing.py PERCMB.json SCANS: SWI visible CMBs (>= 2 mm) found, by the subject's SWI
phase-mask sign and by whether its SWI is a minimum-intensity projection. PERCMB comes from
per_cmb.py (docs/experiments/v32/scripts) on the same scans. Reports only; chooses nothing."""
import collections
import json
import sys
from pathlib import Path

rows = [r for r in json.load(open(sys.argv[1])) if r["mod"] == "swi" and r["vis"] >= 2]
swi = {t.name[:-len("_truth.json")]: json.loads(t.read_text())["params"]["appearance"]["swi"]
       for t in Path(sys.argv[2]).glob("sub-*_truth.json")}
count = collections.Counter()
for r in rows:
    s = swi[r["stem"]]
    for key in (f"mask={s['mask']}", f"mip={'yes' if s['mip'] else 'no'}"):
        count[key, "n"] += 1
        count[key, "found"] += bool(r.get("found"))
keys = sorted({k for k, _ in count})
print(json.dumps({k: f"{count[k, 'found']} / {count[k, 'n']}" for k in keys}, indent=1))
