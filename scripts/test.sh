#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test that runs without a GPU: unit tests, the real-vLLM
# end-to-end tests on a tiny model written at test time, the disk/Redis tiers, and the docs site.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
python -m pytest tests -m "not gpu" -q -p no:cacheprovider --timeout 1500 "$@"
