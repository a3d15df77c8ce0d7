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
# The multi-worker tuning test needs a PostgreSQL server (initdb, pg_ctl); Debian's is installed
# on these machines, and installed here where it is missing and we may.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: no PostgreSQL server found; the multi-worker database test will be skipped" >&2
  fi
fi
