#!/usr/bin/env bash
# The prepared GPU check: one device call of at most ~9.5 minutes on an H100/H200. Prepare with
# bench/gpu_prepare.sh and bench/nnunet/gpu_prepare.sh (SimpleITK, for the default plan's N4), commit, then run
# through the device tool with carry [.whl, .nnpack, .realdata]:
#   MSLPIPE_COMMIT=<short hash> bash bench/gpu_check.sh
# In order, each step bounded by what is left of BUDGET_S (so a slow step costs the later ones, never the call):
#   1. fold 0 of the real data at full width: bench/real_data.py, mslpipe's arm only (no nnU-Net wheels
#      needed), MINUTES training minutes, then `mslpipe evaluate` and predict timing with/without --tta;
#   2. training throughput, pipeline vs bare step, eager and torch.compile;
#   3. inference speed against a bf16 + channels_last + torch.compile forward.
# Back in $OUT (6 files): RESULTS.md, real_data_results.json, gpu_check.log, real_data_logs.tgz, fold 0's log.csv
# and curve.png. Copy the first two into bench/ and commit.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET_S=${BUDGET_S:-540}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
LOG=$OUT/gpu_check.log  # one log: what comes back from $OUT is at most 8 files
bounded() {  # bounded MAX_S cmd...: run with timeout min(MAX_S, time left - 15 s), output to LOG and stdout
  local max=$1; shift; local t; t=$(( $(left) - 15 )); (( t > max )) && t=$max
  if (( t < 20 )); then echo "== skipped (no time left): $*" | tee -a "$LOG"; return 0; fi
  echo "== $(date +%T) [${t}s max] $*" | tee -a "$LOG"
  timeout "$t" "$@" 2>&1 | tee -a "$LOG"; echo "== rc ${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
}
mkdir -p /tmp/site
# SimpleITK (the default plan's N4 needs it) comes unpacked in bench/nnunet/gpu_prepare.sh's .nnpack/site.tar.xz
if [ -f .nnpack/site.tar.xz ]; then tar -xJf .nnpack/site.tar.xz -C /tmp/site || exit 1; fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import SimpleITK, monai, nibabel" \
  || { echo "packages missing: prepare with bench/gpu_prepare.sh and bench/nnunet/gpu_prepare.sh"; exit 2; }
[ -d .realdata ] && export MSLPIPE_REAL_DATA=$PWD/.realdata
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "cpus $(nproc)"; df -h /dev/shm | tail -1
  python3 -c "import torch, monai, nibabel; print('torch', torch.__version__, 'monai', monai.__version__)"
} 2>&1 | tee "$LOG"
W=/tmp/gpu_work
bounded 330 python3 bench/real_data.py --device cuda --folds 0 --arms mslpipe_leaky_unet \
    --minutes-per-fold "${MINUTES:-2}" --work $W
F=$W/mslpipe/results/real/leaky_unet/fold_0
cp $F/log.csv "$OUT/fold0_log.csv" 2>/dev/null; cp $F/curve.png "$OUT/fold0_curve.png" 2>/dev/null
tar czf "$OUT/real_data_logs.tgz" -C $W runs/mslpipe_leaky_unet/fold_0/logs runs/mslpipe_leaky_unet/fold_0/scores \
    2>/dev/null
bounded 150 python3 bench/train_throughput.py --device cuda --compile
# training04_01: a scan where N4 finds a field and runs its full fit (on the training01 scans it stops at once)
bounded 150 python3 bench/predict_speed.py --device cuda --volumes 4 ${MSLPIPE_REAL_DATA:+--scan training04_01}
cp bench/RESULTS.md bench/real_data_results.json "$OUT/" 2>/dev/null
echo "done in $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
