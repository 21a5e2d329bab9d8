"""rank_boot.py SCANS PRED_A PRED_B [...]: the selection rank (FROC at 1 FP/scan after clean-up,
mean over GRE/SWI/QSM) of each bundle, and a paired bootstrap of its difference to the first,
resampling whole subjects (their three scans together)."""
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.evaluation.evaluate import load_cases, _cand_arrays, _truth_refs
from CMBDetectorLib.evaluation import metrics as M

scans = Path(sys.argv[1]); preds = [Path(p) for p in sys.argv[2:]]
# SKIP=sub-1_swi,sub-2_swi leaves those scans out (for example the positive-mask SWI)
import os
skip = set(filter(None, os.environ.get("SKIP", "").split(",")))
ops = []
for p in preds:
    cases, _ = load_cases(p, scans)
    d = {}
    for c in cases:
        if c.name in skip:
            continue
        pts, conf, kept = _cand_arrays(c)
        d[c.name] = (c.truth_name, M.froc_operands({"pred_ras": pts, "confidence": conf, "kept": kept,
                                                     "ref_ras": _truth_refs(c)["ras"]}, require_kept=True))
    ops.append(d)
names = sorted(ops[0])
subjects = sorted({ops[0][n][0] for n in names})
mods = ("gre", "swi", "qsm")

def rank(op, subs):
    vals = []
    for m in mods:
        sel = [n for s in subs for n in names if ops[0][n][0] == s and n.endswith("_" + m)]
        best = np.concatenate([op[n][1][0] for n in sel]); fp = np.concatenate([op[n][1][1] for n in sel])
        vals.append(100 * M.mean_tpr_at_fp(best, fp, len(sel), limits=(1.0,)))
    return vals

base = rank(ops[0], subjects)
print(preds[0].name, [round(v, 1) for v in base], round(np.mean(base), 2))
rng = np.random.default_rng(0)
draws = [list(rng.choice(subjects, len(subjects))) for _ in range(2000)]
for p, op in zip(preds[1:], ops[1:]):
    v = rank(op, subjects)
    diffs = [np.mean(rank(op, s)) - np.mean(rank(ops[0], s)) for s in draws]
    print(p.name, [round(x, 1) for x in v], round(np.mean(v), 2), "diff", round(np.mean(v) - np.mean(base), 2),
          "95% CI", [round(float(x), 2) for x in np.percentile(diffs, [2.5, 97.5])],
          "one-sided 95% lower bound", round(float(np.percentile(diffs, 5)), 2))
