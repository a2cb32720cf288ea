#!/usr/bin/env bash
# Create bench/nnunet/.venv: nnU-Net v2 in its own virtual environment (git-ignored).
#
# nnU-Net is kept apart from mslpipe's .venv: `pip install nnunetv2` pulls torchvision (through timm),
# and the torchvision pip picks next to mslpipe's torch 2.13.0 fails to import. torch 2.14.1 with
# torchvision 0.29.1 works. mslpipe itself is NOT installed here: nnU-Net imports
# mslpipe.architectures.* by class path only, which needs torch alone, so the benchmark puts the
# repository on PYTHONPATH when it runs nnU-Net (see bench/nnunet/README.md).
#
#   bash bench/nnunet/setup.sh            # PYTHON=python3.11 to pick the interpreter
#   bench/nnunet/.venv/bin/nnUNetv2_train --help
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python3}
TORCH=${NNUNET_TORCH:-torch==2.14.1}
TORCHVISION=${NNUNET_TORCHVISION:-torchvision==0.29.1}
NNUNET=${NNUNET_VERSION:-nnunetv2==2.8.1}  # the version checked against mslpipe
if [ ! -x "$here/.venv/bin/python" ]; then
    "$PY" -m venv "$here/.venv"
fi
pip=("$here/.venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# torch first, pinned, so that nnunetv2's dependencies never swap it for another build.
"${pip[@]}" install -q "$TORCH" "$TORCHVISION"
"${pip[@]}" install -q "$NNUNET" "$TORCH" "$TORCHVISION"
"$here/.venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch, torchvision  # noqa: E401 - both must import
import nnunetv2  # noqa: F401
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: F401
print(f"nnunetv2 {md.version('nnunetv2')}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
PY
echo "ready: $here/.venv (run nnU-Net with PYTHONPATH=$(cd "$here/../.." && pwd) so it can import mslpipe)"
