#!/bin/sh
# rank.sh MODELS OUT [SCANS]: detect the selection scans with a bundle at its thresholds, then evaluate.
set -e
M=$1; O=$2; S=${3:-runs/valsel25}
mkdir -p "$O"
for m in gre swi qsm; do
  .venv/bin/cmbdetector detect --quiet --modality $m --models "$M" --output-dir "$O" "$S"/sub-*_$m.nii.gz
done
.venv/bin/cmbdetector evaluate --no-plot -q -o "$O/evaluation" "$O" "$S"
.venv/bin/python - "$O/evaluation/evaluation.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
v = [d["by_modality"][m]["froc"]["cleanup"]["tpr_at_fp"]["1.0"] for m in ("gre", "swi", "qsm")]
print("rank", [round(100 * x, 1) for x in v], "mean", round(100 * sum(v) / 3, 1))
PY
