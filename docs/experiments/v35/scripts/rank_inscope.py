"""rank_inscope.py PRED SCANS OUT: the v35 rule's rank. Evaluates a bundle's predictions on
the selection scans without the SWI scans whose phase mask is `positive` (read from each
subject's truth JSON), and, beside it, on those positive-mask SWI scans alone."""
import json
import subprocess
import sys
from pathlib import Path

pred, scans, out = (Path(a).resolve() for a in sys.argv[1:4])
positive = sorted(p.name.split("_")[0] for p in scans.glob("sub-*_truth.json")
                  if json.loads(p.read_text())["params"].get("appearance", {})
                  .get("swi", {}).get("mask") == "positive")
res = {"positive_mask_subjects": positive}
for name, keep in (("in_scope", lambda f: not any(f.startswith(f"{s}_swi") for s in positive)),
                   ("positive_swi", lambda f: any(f.startswith(f"{s}_swi") for s in positive))):
    d = out / name / "pred"
    d.mkdir(parents=True, exist_ok=True)
    for f in pred.glob("sub-*"):
        if keep(f.name) and not (d / f.name).exists():
            (d / f.name).symlink_to(f)
    subprocess.run([sys.executable, "-m", "CMBDetectorLib.cli", "evaluate", "--no-plot", "-q",
                    "-o", str(out / name / "evaluation"), str(d), str(scans)], check=True)
    ev = json.loads((out / name / "evaluation" / "evaluation.json").read_text())
    raw = {m: 100 * b["froc"]["cleanup"]["tpr_at_fp"]["1.0"]
           for m, b in ev["by_modality"].items() if m in ("gre", "swi", "qsm")}
    res[name] = {m: round(v, 1) for m, v in raw.items()}
    if name == "in_scope":
        res["rank"] = round(sum(raw[m] for m in ("gre", "swi", "qsm")) / 3, 2)
print(json.dumps(res))
