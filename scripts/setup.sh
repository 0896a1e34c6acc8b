#!/usr/bin/env bash
# Create .venv (if missing) and install mechmem with its dev extras.
# torch is pinned to the CPU build that pip finds on these machines' disk; elsewhere pip fetches it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
