#!/usr/bin/env bash
# The main job: set up, then check an example spec on every installed backend against the
# float64 reference, show its IR and block plan, and compile it, on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SPEC=${1:-examples/sliding_window.yaml}
attncc show "$SPEC" --seq 4096
attncc check "$SPEC"
attncc compile "$SPEC" --backend numpy -o out/"$(basename "${SPEC%.*}")"
