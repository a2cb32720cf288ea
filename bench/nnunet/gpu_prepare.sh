#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session of bench/real_data.py. The GPU image has torch, numpy,
# scipy, pandas, scikit-image, scikit-learn, matplotlib, seaborn, tifffile, timm and einops but none of
# nnU-Net's other needs, and no package index. This downloads them as Python 3.12 wheels in two
# git-ignored folders, because one device call carries at most 64 MiB and SimpleITK alone is 53 MB:
#   .whl-nnunet/   SimpleITK + nnU-Net's pure-Python packages     -> device call 1 (gpu_run.sh install)
#   .whl-nnunet2/  blosc2, connected-components-3d, ndindex, numexpr -> device call 2, with bench/gpu_prepare.sh's
#                                                                       .whl (monai, nibabel) and .realdata
# Versions are the ones bench/nnunet/setup.sh installs here and the tests check.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
for d in /.whl-nnunet/ /.whl-nnunet2/ /.nnsite/ /.rdwork/; do
    grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$@"; }
rm -rf .whl-nnunet .whl-nnunet2
dl .whl-nnunet simpleitk==2.5.7 nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
    dynamic-network-architectures==0.4.4
"$PY" -m pip wheel -q --no-deps -w .whl-nnunet acvl-utils==0.2.6   # an sdist only: built here (pure Python)
dl .whl-nnunet2 blosc2==4.14.1 connected-components-3d==4.1.1 ndindex==1.10.1 numexpr==2.14.2
du -sh .whl-nnunet .whl-nnunet2
[ -d .whl ] && [ -d .realdata ] || echo "also run bench/gpu_prepare.sh (monai, nibabel and the real data)"
echo "device call 1: carry [.whl-nnunet], command: bash bench/nnunet/gpu_run.sh install"
echo "device call 2 (right after; the machine stays warm 30 s): carry [.whl, .whl-nnunet2, .realdata],"
echo "  command: FOLDS=0 MINUTES=2 bash bench/nnunet/gpu_run.sh bench"
