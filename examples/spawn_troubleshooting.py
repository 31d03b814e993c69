# SPDX-License-Identifier: Apache-2.0
"""The safe shape of a vLLM script: spawn start method and an ``if __name__ == "__main__":`` guard.

vLLM starts its engine and worker processes with ``fork`` by default. If CUDA is already initialised
in the parent (for example because the script touched ``torch.cuda`` first), a forked child fails
with "Cannot re-initialize CUDA in forked subprocess". With ``spawn`` the children start a fresh
interpreter and re-import this file, so all work must sit behind the ``__main__`` guard.

    python examples/spawn_troubleshooting.py --model Qwen/Qwen3-8B
"""

from __future__ import annotations

import argparse
import os

# [start-spawn]
# 1. Choose spawn before vLLM starts any process (an exported variable works too).
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen3-8B")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    args = parser.parse_args(argv)

    # 2. Import and build vLLM objects inside main(), never at module level.
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=args.model,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_transfer_config=KVTransferConfig(kv_connector="KVOffloadConnector", kv_role="kv_both"),
    )
    output = llm.generate(["1 2 3 4 5"], SamplingParams(temperature=0, max_tokens=4))[0]
    print(f"start method: {os.environ['VLLM_WORKER_MULTIPROC_METHOD']}, "
          f"generated {len(output.outputs[0].token_ids)} tokens")


# 3. The guard: spawned children re-import this file and must not run main() again.
if __name__ == "__main__":
    main()
# [end-spawn]
