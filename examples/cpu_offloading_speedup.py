# SPDX-License-Identifier: Apache-2.0
"""CPU offloading speedup: the same prompts twice, with or without kvoffload.

Each of the prompts is a long prefix of one repeated word, so its KV cache is large. vLLM's GPU prefix
cache is off (as in LMCache's version of this script), so without kvoffload the second run recomputes
everything; with kvoffload it loads the KV cache from CPU memory.

    python examples/cpu_offloading_speedup.py                   # without kvoffload: about 1.0x
    python examples/cpu_offloading_speedup.py --kvoffload       # with kvoffload: second run faster
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen3-8B", help="model name or local path")
    parser.add_argument("--kvoffload", action="store_true", help="offload the KV cache with kvoffload")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=10000,
                        help="approximate tokens per prompt (words of the repeated prefix)")
    parser.add_argument("--prompt-word", default="Hi", help="the word the prefix repeats")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--cpu-size", type=float, default=None,
                        help="kvoffload CPU pool in GB (default: 1.5 GB per 10,000 prompt tokens)")
    return parser.parse_args(argv)


def create_prompts(num_prompts: int, prompt_tokens: int, word: str) -> list[str]:
    """Prompts ``"<i> word word … word"``: distinct (the index comes first), each about prompt_tokens long."""
    body = " ".join([word] * prompt_tokens)
    return [f"{i} {body}" for i in range(num_prompts)]


def timed_generate(llm, prompts, sampling_params) -> float:
    start = time.perf_counter()
    llm.generate(prompts, sampling_params, use_tqdm=False)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = None
    if args.kvoffload:
        cpu_size = args.cpu_size or max(1.0, args.num_prompts * args.prompt_tokens * 1.5 / 10000)
        ktc = KVTransferConfig(
            kv_connector="KVOffloadConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"max_local_cpu_size": cpu_size},
        )
    llm = LLM(
        model=args.model,
        kv_transfer_config=ktc,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    prompts = create_prompts(args.num_prompts, args.prompt_tokens, args.prompt_word)
    sampling_params = SamplingParams(temperature=0, max_tokens=1)

    first = timed_generate(llm, prompts, sampling_params)
    print(f"First run time: {first:.2f} seconds")
    second = timed_generate(llm, prompts, sampling_params)
    print(f"Second run time: {second:.2f} seconds")
    print(f"Speedup (first run / second run): {first / second:.2f}x "
          f"({'with' if args.kvoffload else 'without'} kvoffload)")


if __name__ == "__main__":
    main()
