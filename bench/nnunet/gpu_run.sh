#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root; prepared by bench/nnunet/gpu_prepare.sh.
#   bash bench/nnunet/gpu_run.sh install   # carry [.whl-nnunet]: SimpleITK + nnU-Net into .nnsite/ (kept while warm)
#   FOLDS=0 ARMS=nnunet_2d,mslpipe_leaky_unet MINUTES=2 bash bench/nnunet/gpu_run.sh bench
#                                          # carry [.whl, .whl-nnunet2, .realdata]: runs bench/real_data.py
# bench/real_data_results.json (untracked, so it travels) holds earlier runs' entries: each run adds its
# own and rewrites the table in bench/RESULTS.md. Both files come back in $OUT; copy them into bench/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
SITE=$PWD/.nnsite
inst() { [ -d "$1" ] || return 0
         python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl; }
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
case "${1:-bench}" in
install)
    inst .whl-nnunet || exit 1
    python3 -c "import SimpleITK, nnunetv2; print('SimpleITK', SimpleITK.__version__, 'nnunetv2 ok')" ;;
bench)
    inst .whl || exit 1; inst .whl-nnunet2 || exit 1
    python3 -c "import SimpleITK, nnunetv2, monai, nibabel, blosc2, cc3d, torch; print('torch', torch.__version__)" \
        || { echo "packages missing: run the install call first (the machine may have gone cold)"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    timeout "${TIMEOUT:-540}" python3 bench/real_data.py --device cuda --work "$PWD/.rdwork" \
        --data "${MSLPIPE_REAL_DATA:-$PWD/.realdata}" --nnunet-bin "$SITE/bin" --folds "${FOLDS:-0}" \
        --arms "${ARMS:-nnunet_2d,nnunet_leaky_unet,mslpipe_leaky_unet}" --minutes-per-fold "${MINUTES:-3}" \
        ${EXTRA:-} 2>&1 | tee "$OUT/real_data.log"
    rc=${PIPESTATUS[0]}
    cp bench/real_data_results.json bench/RESULTS.md "$OUT/" 2>/dev/null
    tar czf "$OUT/logs.tgz" --exclude='*.nii.gz' -C .rdwork logs runs 2>/dev/null
    exit "$rc" ;;
*) echo "usage: gpu_run.sh install|bench"; exit 2 ;;
esac
