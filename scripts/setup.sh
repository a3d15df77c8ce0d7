#!/usr/bin/env bash
# Install what attncc's main job and its tests need, idempotently, into the current Python.
# PyTorch: the pinned CPU build is installed first when no torch is present, so that no
# requirement pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,viz,tune,postgres,triton,hf]"
