#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (no GPU needed; Triton kernels run interpreted).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check .
python3 -m pytest "$@"
