#!/usr/bin/env bash
# Run HERE (the CPU machine) before a device session: gathers what bench/gpu_check.sh needs into
# two git-ignored folders that the device tool carries: .whl (wheels the GPU image lacks, for its
# Python 3.12) and .realdata (a copy of ../shared/data/real-ms-isbi; never committed).
# Optional (a CPU dry run of bench/nnunet/gpu_run.sh here): PYVER (the target Python, default 3.12, the GPU
# image's), WHL (the wheels' folder, default .whl) and NO_DATA=1 (leave .realdata as it is), e.g.
#   PYVER=3.11 WHL=.whl311 NO_DATA=1 bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
WHL=${WHL:-.whl}
grep -qx "/$WHL/" .git/info/exclude 2>/dev/null || echo "/$WHL/" >> .git/info/exclude
grep -qx '/.realdata/' .git/info/exclude 2>/dev/null || echo '/.realdata/' >> .git/info/exclude
PY=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# pure-Python packages; SimpleITK (DICOM, and the default plan's N4) is not here: its wheel is ~50 MB, so
# bench/nnunet/gpu_prepare.sh packs it, unpacked and compressed, into .nnpack/site.tar.xz
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" \
    -d "$WHL" monai==1.6.1 nibabel==5.4.2 importlib-resources
[ "${NO_DATA:-}" = 1 ] || { rm -rf .realdata && cp -r ../shared/data/real-ms-isbi .realdata; }
du -sh "$WHL" .realdata
[ -f .nnpack/site.tar.xz ] || echo "also run bench/nnunet/gpu_prepare.sh: SimpleITK (N4) comes in its .nnpack"
echo "now call the device tool with carry [.whl, .nnpack, .realdata] and command: bash bench/gpu_check.sh"
