#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh goes to a lent GPU machine (device tool, carry [".whl"]).
# That machine's image has torch, transformers, accelerate, pandas, pyarrow and most of what mechmem
# imports, but no TransformerLens, plotly or datasets, and no package index. This downloads, for its
# Python 3.12 on x86-64, the wheels it lacks (and transformers at the version CI tests, since the
# fast path is checked against it) into .whl/, about 26 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  transformer-lens==4.3.0 transformers==5.23.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 lz4==4.4.5 plotly==7.1.0 platformdirs==4.14.9
du -sh .whl
