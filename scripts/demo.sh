#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model: the report of all five methods'
# headline experiments with their controls, at smoke scale (report/index.html, results.json,
# summary.md). An interrupted run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mechmem report --scale smoke --out report
