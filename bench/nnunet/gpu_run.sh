#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root; prepared by bench/gpu_prepare.sh and
# bench/nnunet/gpu_prepare.sh. One call, carry [.whl, .nnpack, .realdata]:
#   FOLDS=0 ARMS=nnunet_2d MINUTES=2 bash bench/nnunet/gpu_run.sh
#   RUNS=1:nnunet_leaky_unet,2:nnunet_2d MINUTES=1.5 bash bench/nnunet/gpu_run.sh     # FOLD:ARM pairs instead
# Unpacks .nnpack/site.tar.xz and installs the wheels into .nnsite/, then runs bench/real_data.py.
# bench/real_data_results.json (committed) holds earlier runs' entries: each run adds its own (kept in .rdwork
# across calls on a warm machine) and rewrites the table in bench/RESULTS.md. Both files come back in $OUT; copy
# them into bench/ and commit.
# MSLPIPE_COMMIT=<short hash> names the commit in RESULTS.md (the device copy has no git).
# Optional, for a CPU dry run of this script (see bench/nnunet/README.md); the defaults are the GPU machine's:
#   DEVICE (cuda), WHL and NNPACK (the carried folders, .whl and .nnpack), NNSITE (where they are installed,
#   .nnsite), TIMEOUT (seconds for bench/real_data.py, 540), EXTRA (more arguments for it).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
WHL=${WHL:-.whl}
NNPACK=${NNPACK:-.nnpack}
SITE=${NNSITE:-.nnsite}; [ "${SITE#/}" != "$SITE" ] || SITE=$PWD/$SITE   # absolute: scripts in it run elsewhere
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
mkdir -p "$SITE"
if [ -f "$NNPACK/site.tar.xz" ]; then tar -xJf "$NNPACK/site.tar.xz" -C "$SITE" || exit 1; fi
for d in "$WHL" "$NNPACK"; do
    if compgen -G "$d/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl \
            || exit 1
    fi
done
python3 -c "import SimpleITK, nnunetv2, monai, nibabel, blosc2, cc3d, torch; print('torch', torch.__version__)" \
    || { echo "packages missing: prepare with bench/gpu_prepare.sh and bench/nnunet/gpu_prepare.sh"; exit 2; }
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
# Entries accumulate in the work folder, which a warm machine keeps between calls (the tracked
# bench/real_data_results.json is copied afresh with every call): the first call starts from the committed one.
mkdir -p .rdwork
if [ ! -f .rdwork/real_data_results.json ]; then
    if [ "$DEVICE" = cuda ]; then cp bench/real_data_results.json .rdwork/ || exit 1
    else echo '{"entries": []}' > .rdwork/real_data_results.json; fi   # a CPU dry run keeps its own entries
fi
if [ -n "${RUNS:-}" ]; then WHAT=(--runs "$RUNS")   # FOLD:ARM pairs, e.g. 1:nnunet_leaky_unet,2:nnunet_2d
else WHAT=(--folds "${FOLDS:-0}" --arms "${ARMS:-nnunet_2d,nnunet_leaky_unet,mslpipe_leaky_unet}"); fi
timeout "${TIMEOUT:-540}" python3 bench/real_data.py --device "$DEVICE" --work "$PWD/.rdwork" \
    --results "$PWD/.rdwork/real_data_results.json" \
    --data "${MSLPIPE_REAL_DATA:-$PWD/.realdata}" --nnunet-bin "$SITE/bin" "${WHAT[@]}" \
    --minutes-per-fold "${MINUTES:-3}" ${EXTRA:-} 2>&1 | tee "$OUT/real_data.log"
rc=${PIPESTATUS[0]}
cp .rdwork/real_data_results.json bench/RESULTS.md "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" --exclude='*.nii.gz' -C .rdwork logs runs 2>/dev/null
exit "$rc"
