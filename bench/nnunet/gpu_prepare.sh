#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session of bench/real_data.py with nnU-Net's arms. The GPU image has
# torch, numpy, scipy, pandas, scikit-image, scikit-learn, matplotlib, seaborn, tifffile, timm and einops but
# none of nnU-Net's other needs, and no package index. One device call carries at most 64 MiB, and SimpleITK's
# wheel alone is 53 MB, so this packs what the image lacks into one git-ignored folder, .nnpack/:
#   site.tar.xz  the unpacked wheels of SimpleITK, blosc2, connected-components-3d, ndindex and numexpr
#                (compiled; xz -9 takes them from 66 to ~35 MB; ~3 minutes here)
#   *.whl        nnU-Net's pure-Python packages (installed with pip there, which writes nnUNetv2_* scripts)
# With bench/gpu_prepare.sh's .whl (monai, nibabel) and .realdata, one call carries ~60 MB:
#   carry [.whl, .nnpack, .realdata], command: FOLDS=0 ARMS=nnunet_2d MINUTES=2 bash bench/nnunet/gpu_run.sh
# Versions are the ones bench/nnunet/setup.sh installs here and the tests check.
# Optional (a CPU dry run of gpu_run.sh here, see bench/nnunet/README.md): PYVER (the target Python, default 3.12,
# the GPU image's) and NNPACK (the output folder, default .nnpack), e.g. PYVER=3.11 NNPACK=.nnpack311.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
PYVER=${PYVER:-3.12}
NNPACK=${NNPACK:-.nnpack}
for d in "/$NNPACK/" /.nnsite/ /.rdwork/; do
    grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" -d "$@"; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf "$NNPACK" && mkdir -p "$NNPACK" "$tmp/compiled" "$tmp/site"
dl "$NNPACK" nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 dynamic-network-architectures==0.4.4
"$PY" -m pip wheel -q --no-deps -w "$NNPACK" acvl-utils==0.2.6   # an sdist only: built here (pure Python)
dl "$tmp/compiled" simpleitk==2.5.7 blosc2==4.14.1 connected-components-3d==4.1.1 ndindex==1.10.1 numexpr==2.14.2
for w in "$tmp"/compiled/*.whl; do "$PY" -m zipfile -e "$w" "$tmp/site"; done   # a wheel is a zip: unpacked = installed
XZ_OPT="-9 -T0" tar -cJf "$NNPACK/site.tar.xz" -C "$tmp/site" .
du -sh "$NNPACK"
[ -d .whl ] && [ -d .realdata ] || echo "also run bench/gpu_prepare.sh (monai, nibabel and the real data)"
du -cb .whl "$NNPACK" .realdata 2>/dev/null | tail -1 | awk '{printf "carried: %.1f MB of 67.1 (64 MiB, with the working tree)\n", $1/1e6}'
echo "device call: carry [.whl, .nnpack, .realdata], command: FOLDS=0 ARMS=nnunet_2d MINUTES=2 bash bench/nnunet/gpu_run.sh"
