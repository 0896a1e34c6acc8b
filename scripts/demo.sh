#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model: greedy generation through
# mechmem's engine, and the logit-delta layer sweep of a steering vector (JSON + HTML in results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mechmem generate "The three most useful ideas in physics are" --max-new-tokens 48
mechmem probe logit-delta "The capital of France is" "Water boils at" --scale 8 --out results
