#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every test that runs without a GPU: unit tests, the real-vLLM
# end-to-end tests on a tiny model written at test time, the disk/Redis tiers, and the docs site with
# its page examples and notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
python -m pytest tests -m "not gpu" -q -p no:cacheprovider --timeout 1500 "$@"
# The docs' runnable parts that live outside tests/: every >>> example on the pages, and the notebook,
# whose cells nbval re-runs against their stored outputs (a broken one fails CI like any test).
bash scripts/check_docs.sh pages
