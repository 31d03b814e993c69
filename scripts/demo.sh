#!/usr/bin/env bash
# Set up (scripts/setup.sh), write the tiny random-weight model, and run the quickstart demo on it:
# the same long prompts twice through real vLLM, first computed and stored, then loaded by kvoffload.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${KVO_DEMO_MODEL:-/tmp/kvoffload-tiny-model}
python tests/tiny_model.py "$model" >/dev/null
python examples/offline_offload.py --model "$model" --max-model-len 8192 --gpu-memory-utilization 0.3 \
  --max-num-batched-tokens 512 "$@"
