"""operands.py OUT.json PRED SCANS: keep what the selection rank needs of each scan (per true
CMB the best kept confidence within the match distance, -1 for none; the kept false
positives' confidences), merged into OUT.json, so that a rank survives a machine whose runs/
is gone and can be pooled over subjects detected in different sessions (boot.py)."""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.evaluation import metrics as M  # noqa: E402
from CMBDetectorLib.evaluation.evaluate import _cand_arrays, _truth_refs, load_cases  # noqa: E402

out, pred, scans = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ops = json.loads(out.read_text()) if out.exists() else {}
cases, _ = load_cases(pred, scans)
for c in cases:
    pts, conf, kept = _cand_arrays(c)
    best, fp = M.froc_operands({"pred_ras": pts, "confidence": conf, "kept": kept,
                                "ref_ras": _truth_refs(c)["ras"]}, require_kept=True)
    ops[c.name] = {"subject": c.truth_name,
                   "best": [round(float(b), 6) if np.isfinite(b) else -1.0 for b in best],
                   "fp": [round(float(f), 6) for f in fp]}
out.write_text(json.dumps(ops, indent=0, sort_keys=True))
print(f"{out}: {len(ops)} scans ({len(cases)} from {pred})")
