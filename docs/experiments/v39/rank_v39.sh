#!/bin/bash
# rank_v39.sh: the v39 rule in one resumable command (selection_rule.md). Simulates the 96
# selection subjects 3100352-3100447 with the fixed simulator (runs/valsel_v39), detects them
# with the bundled v37 and with v39 (runs/v39/models), each at its own thresholds, writes
# ops_v37.json and ops_v39.json here and prints the paired bootstrap of v39 - v37.
# A chunk of subjects whose outputs all exist is skipped; two chunks run side by side, one
# thread each (about 15 s per scan each).
set -euo pipefail
S=${S:-runs/valsel_v39}
HERE=docs/experiments/v39
OPS=docs/experiments/v37_confirm
V37=CMBDetector/Resources/Models
V39=${V39:-runs/v39/models}
FIRST=352 LAST=447

mkdir -p "$S"
n=$(ls "$S"/*_truth.json 2>/dev/null | wc -l || true)
if [ "$n" -ne 96 ]; then
  OMP_NUM_THREADS=1 .venv/bin/cmbdetector synth --split validation --seed "$FIRST" --n 96 \
      --jobs 2 --out "$S"
fi

chunk() {  # chunk MODELS OUT FIRST LAST: detect subjects FIRST..LAST, all three modalities
  local models=$1 out=$2 a=$3 b=$4 m s files done_all=1
  for s in $(seq "$a" "$b"); do
    for m in gre swi qsm; do
      [ -f "$out/sub-3100${s}_${m}_detection.json" ] || done_all=0
    done
  done
  [ "$done_all" -eq 1 ] && return 0
  for m in gre swi qsm; do
    files=$(for s in $(seq "$a" "$b"); do echo "$S/sub-3100${s}_${m}.nii.gz"; done)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 .venv/bin/cmbdetector detect $files --modality "$m" --models "$models" \
        --output-dir "$out" --quiet
  done
  echo "chunk $a-$b done $(date +%T)" >&2
}
lane() {  # lane MODELS OUT STEP OFFSET: every other 4-subject chunk, starting at OFFSET
  local c e k=$3
  for ((c = FIRST + $4 * k; c <= LAST; c += 2 * k)); do
    e=$((c + k - 1)); [ "$e" -gt "$LAST" ] && e=$LAST
    chunk "$1" "$2" "$c" "$e"
  done
}
run_pair() {  # run_pair MODELS OUT: two lanes side by side
  mkdir -p "$2"
  lane "$1" "$2" 4 0 & local p=$!
  lane "$1" "$2" 4 1
  wait "$p"
}
run_pair "$V37" runs/rank/v37_v39sel
.venv/bin/python "$OPS/operands.py" "$HERE/ops_v37.json" runs/rank/v37_v39sel "$S"
if [ "${1:-}" = "--v37-only" ]; then exit 0; fi
run_pair "$V39" runs/rank/v39_v39sel
.venv/bin/python "$OPS/operands.py" "$HERE/ops_v39.json" runs/rank/v39_v39sel "$S"
echo "== 96 (continue only if the one-sided lower bound of v39 - v37 is above 0)"
.venv/bin/python "$OPS/boot.py" "$HERE/ops_v37.json" "$HERE/ops_v39.json"
