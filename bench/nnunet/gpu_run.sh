#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root; prepared by bench/gpu_prepare.sh and
# bench/nnunet/gpu_prepare.sh. One call, carry [.whl, .nnpack, .realdata]:
#   FOLDS=0 ARMS=nnunet_2d MINUTES=2 bash bench/nnunet/gpu_run.sh
# Unpacks .nnpack/site.tar.xz and installs the wheels into .nnsite/, then runs bench/real_data.py.
# bench/real_data_results.json (committed) holds earlier runs' entries: each run adds its own and rewrites the
# table in bench/RESULTS.md. Both files come back in $OUT; copy them into bench/ and commit.
# MSLPIPE_COMMIT=<short hash> names the commit in RESULTS.md (the device copy has no git).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
SITE=$PWD/.nnsite
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
mkdir -p "$SITE"
if [ -f .nnpack/site.tar.xz ]; then tar -xJf .nnpack/site.tar.xz -C "$SITE" || exit 1; fi
for d in .whl .nnpack; do
    if compgen -G "$d/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$d"/*.whl \
            || exit 1
    fi
done
python3 -c "import SimpleITK, nnunetv2, monai, nibabel, blosc2, cc3d, torch; print('torch', torch.__version__)" \
    || { echo "packages missing: prepare with bench/gpu_prepare.sh and bench/nnunet/gpu_prepare.sh"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${TIMEOUT:-540}" python3 bench/real_data.py --device cuda --work "$PWD/.rdwork" \
    --data "${MSLPIPE_REAL_DATA:-$PWD/.realdata}" --nnunet-bin "$SITE/bin" --folds "${FOLDS:-0}" \
    --arms "${ARMS:-nnunet_2d,nnunet_leaky_unet,mslpipe_leaky_unet}" --minutes-per-fold "${MINUTES:-3}" \
    ${EXTRA:-} 2>&1 | tee "$OUT/real_data.log"
rc=${PIPESTATUS[0]}
cp bench/real_data_results.json bench/RESULTS.md "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" --exclude='*.nii.gz' -C .rdwork logs runs 2>/dev/null
exit "$rc"
