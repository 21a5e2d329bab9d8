#!/usr/bin/env bash
# CPU-vs-CUDA check on a lent GPU machine: the CUDA tests, the comparison on whole-brain
# validation scans and the benchmark on both devices (docs/development.md, "On a lent GPU
# machine"). Run from the repository root.
#
# Before it, here (the development machine), once: bash Testing/device/pack_wheels.sh
#   The device has torch/numpy/scipy/pytest but no SimpleITK, nibabel or nilearn and no
#   network; that script packs them into .whl/site.tar.xz (~41 MB; git-ignored) for carry.
#   Without the archive this script stops at once and says so.
# Then the run tool: command "bash Testing/device/device_check.sh", carry [".whl"],
#   timeout_s 590. Paste $OUT/device_check.txt into the note (the JSON files hold the details).
#
# Time budget on the H200 (estimates; the machine's start-up, 1-2 min, comes on top):
#   step                                         estimate   its limit
#   unpack the archive                           ~10 s      -
#   pytest test_cuda.py + test_models.py         ~1 min     150 s (tiny training included)
#   comparison, 3 validation scans x 2 devices   ~1 min     140 s
#   bench --device cuda                          ~1 min     110 s (3 simulated brains)
#   bench --device cpu                           ~1.5 min   140 s
#   in all                                       ~5 min     540 s
#   Each step has its own `timeout`; a step that overruns is reported and the next one runs.
#
# Dry run here, without a GPU (both sides on the CPU, one 64 mm crop, only test_cuda.py, the
# bench's flags checked but not measured):
#   DEVICE_CHECK_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/devcheck bash Testing/device/device_check.sh
#
# Variables: OUT (output folder; the run tool sets it), PYTHON (default python3),
#   DEVICE_WHEELS (folder of site.tar.xz, default .whl), DEVICE_CHECK_DRY=1.
set -uo pipefail
OUT=${OUT:-out/device_check}
PY=${PYTHON:-python3}
W=${DEVICE_WHEELS:-.whl}
DRY=${DEVICE_CHECK_DRY:-0}
mkdir -p "$OUT"
LOG="$OUT/device_check.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1
status=0

say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
step() {  # step SECONDS NAME CMD...: run with a time limit, log its output, remember a failure
    local limit=$1 name=$2 rc; shift 2
    say "$name"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "!! $name: stopped after $limit s" | tee -a "$LOG"
    [ "$rc" != 0 ] && { echo "!! $name: exit $rc" | tee -a "$LOG"; status=1; }
    return 0
}

say "environment"
{ nvidia-smi || echo "nvidia-smi: not available"; } 2>&1 | tee -a "$LOG"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
 '| CUDA', torch.version.cuda, '| available', torch.cuda.is_available(),
 '| cudnn', torch.backends.cudnn.version())" 2>&1 | tee -a "$LOG"

if [ -f "$W/site.tar.xz" ]; then  # SimpleITK, nibabel, nilearn (pack_wheels.sh)
    say "unpacking $W/site.tar.xz into /tmp/site"
    mkdir -p /tmp/site
    "$PY" -c "import sys, tarfile
t = tarfile.open(sys.argv[1])
t.extractall(sys.argv[2], **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))" \
        "$W/site.tar.xz" /tmp/site 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:CMBDetector
else
    export PYTHONPATH=CMBDetector
fi
if ! "$PY" -c "import SimpleITK, nibabel, nilearn" 2>>"$LOG"; then
    echo "!! SimpleITK/nibabel/nilearn missing: run 'bash Testing/device/pack_wheels.sh' on the" \
         "development machine and carry .whl (see this script's header)" | tee -a "$LOG"
    exit 3
fi

if [ "$DRY" = 1 ]; then
    step 300 "pytest (dry run: test_cuda.py only, expect every test skipped)" \
        "$PY" -m pytest -q -rs Testing/engine/test_cuda.py
    step 300 "CPU-vs-CPU comparison (dry run)" "$PY" Testing/device/compare_devices.py --dry \
        --json "$OUT/compare_devices.json" --reference Testing/device/reference_cpu.json
    step 60 "bench flags (dry run: not measured)" "$PY" -m CMBDetectorLib.cli bench --help
    say "done (dry run), status $status"
    exit $status
fi

step 150 "pytest test_cuda.py test_models.py" \
    "$PY" -m pytest -q -rs Testing/engine/test_cuda.py Testing/engine/test_models.py
step 140 "CPU-vs-CUDA comparison on validation scans" "$PY" Testing/device/compare_devices.py \
    --json "$OUT/compare_devices.json" --reference Testing/device/reference_cpu.json
step 110 "bench --device cuda" "$PY" -m CMBDetectorLib.cli bench --device cuda --skip-location \
    --json "$OUT/bench_cuda.json"
step 140 "bench --device cpu" "$PY" -m CMBDetectorLib.cli bench --device cpu --skip-location \
    --json "$OUT/bench_cpu.json"
say "done, status $status"
exit $status
