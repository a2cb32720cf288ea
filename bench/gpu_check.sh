#!/usr/bin/env bash
# The prepared GPU check (one device call, < 10 minutes on an H100/H200). Prepare with
# bench/gpu_prepare.sh, then run through the device tool with carry [.whl, .realdata]:
#   inference speed vs a bf16 + channels_last + torch.compile forward, folder throughput,
#   training throughput (pipeline vs bare step), and fold 0 of the real data at full width.
# Everything lands in $OUT (logs, RESULTS.md, the fold's log.csv and curve.png).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -d .realdata ] && export MSLPIPE_REAL_DATA=$PWD/.realdata
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai, nibabel; print('torch', torch.__version__, 'monai', monai.__version__)"
timeout 150 python3 bench/predict_speed.py --device cuda 2>&1 | tee "$OUT/predict_speed.log"
timeout 120 python3 bench/train_throughput.py --device cuda --compile 2>&1 | tee "$OUT/train_throughput.log"
W=/tmp/gpu_work
timeout 280 python3 -m mslpipe --raw $W/raw --plans $W/plans --preprocessed $W/pre --results $W/results \
    plan -d real -i "${MSLPIPE_REAL_DATA:-../shared/data/real-ms-isbi}" --device cuda --test-fraction 0 \
  && timeout 240 python3 -m mslpipe --plans $W/plans --preprocessed $W/pre --results $W/results \
    train -d real --fold 0 --epochs ${EPOCHS:-20} --iterations ${ITERS:-100} --device cuda 2>&1 | tail -5 \
    | tee "$OUT/train_fold0.log"
cp $W/results/real/leaky_unet/fold_0/log.csv "$OUT/fold0_log.csv" 2>/dev/null
cp $W/results/real/leaky_unet/fold_0/curve.png "$OUT/fold0_curve.png" 2>/dev/null
cp bench/RESULTS.md "$OUT/RESULTS.md"
