#!/bin/bash
# rank_v38.sh [MODELS]: detect the rule's 96 + 48 selection subjects with v38's bundle (default
# runs/v38/models) at its own thresholds, merge the per-scan operands and print both bootstrap
# comparisons against v37 (selection_rule.md). Resumable: a chunk of subjects whose outputs all
# exist is skipped. Two chunks run side by side, one thread each (about 15 s per scan each).
#
# The scans (as made in the eighteenth to twentieth sessions, all five anatomies):
#   runs/valsel96   3100200-3100295 (synth --split validation --seed 200 --n 96), except
#   runs/valsel_208 3100208-3100215 (--seed 208 --n 8 --n-cmbs 4 10), which replace them;
#   runs/valsel_d   3100304-3100327 and runs/valsel_d2 3100328-3100351 (the new 48).
# They are linked into runs/sel_v38 so that one folder holds each subject once.
set -euo pipefail
M=${1:-runs/v38/models}
S=runs/sel_v38
O96=${O96:-runs/rank/v38_96}
O48=${O48:-runs/rank/v38_new48}
HERE=docs/experiments/v38
OUT=${OUT:-$HERE}  # where ops_v38*.json are written
OPS=docs/experiments/v37_confirm

link() {  # link SRC_DIR FIRST LAST: link those subjects' files into $S
  for s in $(seq "$2" "$3"); do
    for f in "$1"/sub-3100"${s}"_*; do ln -sf "$(realpath "$f")" "$S/$(basename "$f")"; done
  done
}
mkdir -p "$S" "$O96" "$O48" "$OUT"
link runs/valsel96 200 207; link runs/valsel_208 208 215; link runs/valsel96 216 295
link runs/valsel_d 304 327; link runs/valsel_d2 328 351
n=$(ls "$S"/*_truth.json | wc -l)
[ "$n" -eq 144 ] || { echo "expected 144 subjects in $S, found $n" >&2; exit 1; }

chunk() {  # chunk OUT FIRST LAST: detect subjects FIRST..LAST, all three modalities
  local out=$1 a=$2 b=$3 m s files done_all=1
  for s in $(seq "$a" "$b"); do
    for m in gre swi qsm; do
      [ -f "$out/sub-3100${s}_${m}_detection.json" ] || done_all=0
    done
  done
  [ "$done_all" -eq 1 ] && return 0
  for m in gre swi qsm; do
    files=$(for s in $(seq "$a" "$b"); do echo "$S/sub-3100${s}_${m}.nii.gz"; done)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 .venv/bin/cmbdetector detect $files --modality "$m" --models "$M" \
        --output-dir "$out" --quiet
  done
  echo "chunk $a-$b done $(date +%T)" >&2
}
lane() {  # lane OUT FIRST LAST STEP OFFSET: every other chunk, starting at OFFSET
  local out=$1 a=$2 b=$3 k=$4 c e
  for ((c = a + $5 * k; c <= b; c += 2 * k)); do
    e=$((c + k - 1)); [ "$e" -gt "$b" ] && e=$b
    chunk "$out" "$c" "$e"
  done
}
run_pair() {  # run_pair OUT FIRST LAST: two lanes of 4-subject chunks side by side
  lane "$1" "$2" "$3" 4 0 & local p=$!
  lane "$1" "$2" "$3" 4 1
  wait "$p"
}
# the new 48 first: condition 2 is decided on them alone
run_pair "$O48" 304 351
run_pair "$O96" 200 295

.venv/bin/python "$OPS/operands.py" "$OUT/ops_v38_new48.json" "$O48" "$S"
.venv/bin/python "$OPS/operands.py" "$OUT/ops_v38.json" "$O96" "$S"
echo "== new 48 (condition 2: v38 above v37)"
.venv/bin/python "$OPS/boot.py" "$HERE/ops_v37_new48.json" "$OUT/ops_v38_new48.json"
echo "== 96 (condition 1: one-sided lower bound of v38 - v37 above 0)"
.venv/bin/python "$OPS/boot.py" "$OPS/ops_v37.json" "$OUT/ops_v38.json"
