"""boot.py BASE.json OTHER.json [SUBJECT_PREFIX_RANGE]: the selection rank (mean over GRE/SWI/QSM
of the TPR at 1 FP per scan after clean-up) of two bundles from their saved operands
(operands.py), and the paired subject bootstrap of the difference (2,000 draws, seed 0), as
../v35/scripts/rank_boot.py computes it from prediction folders. Only scans both files hold
count; LO-HI (seeds, e.g. 3100248-3100295) restricts to those subjects."""
import json
import sys

import numpy as np

sys.path.insert(0, "CMBDetector")
from CMBDetectorLib.evaluation import metrics as M  # noqa: E402

a, b = (json.load(open(p)) for p in sys.argv[1:3])
names = sorted(set(a) & set(b))
if len(sys.argv) > 3:
    lo, hi = (int(x) for x in sys.argv[3].split("-"))
    names = [n for n in names if lo <= int(a[n]["subject"].split("-")[1]) <= hi]
subjects = sorted({a[n]["subject"] for n in names})
mods = ("gre", "swi", "qsm")
by_sub = {s: [n for n in names if a[n]["subject"] == s] for s in subjects}


def rank(ops, subs):
    vals = []
    for m in mods:
        sel = [n for s in subs for n in by_sub[s] if n.endswith("_" + m)]
        best = np.array([x if x >= 0 else -np.inf for n in sel for x in ops[n]["best"]], float)
        fp = np.array([x for n in sel for x in ops[n]["fp"]], float)
        vals.append(100 * M.mean_tpr_at_fp(best, fp, len(sel), limits=(1.0,)))
    return vals


base, other = rank(a, subjects), rank(b, subjects)
rng = np.random.default_rng(0)
draws = [list(rng.choice(subjects, len(subjects))) for _ in range(2000)]
diffs = [np.mean(rank(b, s)) - np.mean(rank(a, s)) for s in draws]
print(f"{len(subjects)} subjects, {len(names)} scans")
print(sys.argv[1], [round(v, 1) for v in base], round(np.mean(base), 2))
print(sys.argv[2], [round(v, 1) for v in other], round(np.mean(other), 2),
      "diff", round(np.mean(other) - np.mean(base), 2),
      "95% CI", [round(float(x), 2) for x in np.percentile(diffs, [2.5, 97.5])],
      "one-sided 95% lower bound", round(float(np.percentile(diffs, 5)), 2))
