# SPDX-License-Identifier: Apache-2.0
"""Offline inference with the KV cache offloaded to CPU memory by kvoffload.

Runs one long prompt twice. The first pass computes the prefix and stores its KV cache in the
kvoffload CPU pool; the second pass loads it from there instead of recomputing it (vLLM's own GPU
prefix cache is switched off here so that the hit is visibly kvoffload's).

    python examples/offline_offload.py                        # Qwen/Qwen3-8B on a GPU
    python examples/offline_offload.py --model /path/to/model --max-model-len 4096
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen3-8B", help="model name or local path")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="vLLM's prefill chunk budget (default: vLLM's own)")
    parser.add_argument("--cpu-size", type=float, default=5.0, help="kvoffload CPU pool in GB")
    parser.add_argument("--prefix-words", type=int, default=3000,
                        help="words in the shared prefix (about 1.3 tokens each on Qwen3)")
    parser.add_argument("--prompt-word", default="Hello", help="the word the prefix repeats")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # [start-offline]
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = KVTransferConfig(
        kv_connector="KVOffloadConnector",
        kv_role="kv_both",
        kv_connector_extra_config={"max_local_cpu_size": args.cpu_size},  # GB of CPU memory
    )
    llm = LLM(
        model=args.model,
        kv_transfer_config=ktc,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # show kvoffload's hit, not vLLM's GPU prefix cache
    )

    shared_prefix = " ".join([args.prompt_word] * args.prefix_words)
    prompts = [shared_prefix + " my name is"]
    sampling_params = SamplingParams(temperature=0, max_tokens=10)

    for attempt in ("first (cold)", "second (warm)"):
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling_params)
        elapsed = time.perf_counter() - start
        print(f"{attempt}: {elapsed:.2f} s, generated text: {outputs[0].outputs[0].text!r}")
    # [end-offline]


if __name__ == "__main__":  # required: vLLM starts worker processes that re-import this file
    main()
