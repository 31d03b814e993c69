"""Two vLLM instances sharing one Redis: instance B's TTFT for a prefix instance A computed, against recompute.

Starts a local ``redis-server`` (or, with ``--cluster``, a 3-master Redis Cluster), then two engines, one after the other, each in its own process with a CPU
pool too small to matter. Instance A computes ``--prompts`` long prompts (written out to Redis); instance
B, a fresh process with an empty pool, sends them again (loaded from Redis) and, in the same run, as many
prompts of the same length that nobody computed before (recomputed). Printed: B's median TTFT of each kind
and the ratio, and what B read from Redis (its tier's summary at shutdown).

    python benchmarks/shared_remote.py                       # the tiny test model (written to build/)
    python benchmarks/shared_remote.py --cluster             # the same through a 3-master cluster
    python benchmarks/shared_remote.py --model /path/to/model --tokens 8000
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine(model: str, remote_url: str, prompts: list[list[int]], gpu_memory_utilization: float) -> dict:
    """Run one instance in this process: each prompt alone, its TTFT measured as the time to one token."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max(len(p) for p in prompts) + 8,
              enable_prefix_caching=False, enforce_eager=True, disable_log_stats=False,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="KVOffloadConnector", kv_role="kv_both",
                  kv_connector_extra_config={"remote_url": remote_url, "max_local_cpu_size": 0.05}))
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([{"prompt_token_ids": [5] * 64}], params, use_tqdm=False)  # warm-up, not measured
    ttft = []
    for prompt in prompts:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
    stats = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
             if m.name.startswith("vllm:external_prefix_cache")}
    return {"ttft": ttft, "metrics": stats}


def run_instance(args: argparse.Namespace, remote_url: str, prompts: list[list[int]]) -> dict:
    spec = {"model": args.model, "remote_url": remote_url, "prompts": prompts, "util": args.gpu_memory_utilization}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(spec, file)
    proc = subprocess.run([sys.executable, __file__, "--instance", file.name], capture_output=True, text=True,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"ttft"')]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"instance failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(lines[-1])
    result["log"] = proc.stdout + proc.stderr
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the tiny test model, written to build/tiny-model")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--cluster", action="store_true", help="share a local 3-master Redis Cluster instead")
    parser.add_argument("--instance", help=argparse.SUPPRESS)  # internal: run one instance from a spec file
    args = parser.parse_args()
    if args.instance:
        spec = json.loads(Path(args.instance).read_text())
        print(json.dumps(engine(spec["model"], spec["remote_url"], spec["prompts"], spec["util"])), flush=True)
        return
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from tests.tiny_model import write_tiny_model
        args.model = str(write_tiny_model(ROOT / "build" / "tiny-model"))
    sys.path.insert(0, str(ROOT))
    from tests.redis_cluster import RedisCluster
    from tests.redis_server import RedisServer

    shared = [[(i * 31 + p * 7919) % 9000 + 40 for i in range(args.tokens)] for p in range(args.prompts)]
    fresh = [[(i * 17 + p * 104729) % 9000 + 40 for i in range(args.tokens)] for p in range(args.prompts)]
    server = RedisCluster() if args.cluster else RedisServer()
    server.start()
    try:
        run_instance(args, server.url, shared)  # instance A computes and writes out
        b = run_instance(args, server.url, shared + fresh)  # instance B: from Redis, then recomputed
    finally:
        server.close()
    from_redis, recomputed = b["ttft"][:args.prompts], b["ttft"][args.prompts:]
    hit, miss = statistics.median(from_redis), statistics.median(recomputed)
    print(f"model {args.model}, {args.prompts} prompts of {args.tokens} tokens, "
          f"{'a 3-master Redis Cluster' if args.cluster else 'one redis-server'}")
    print(f"instance B, prefix computed by instance A, loaded from Redis: median TTFT {hit:.3f} s")
    print(f"instance B, prefix nobody computed, recomputed:             median TTFT {miss:.3f} s")
    print(f"ratio (recompute / from Redis): {miss / hit:.2f}x")
    print(f"vLLM's external prefix cache on B: {b['metrics']}")
    read = re.findall(r"kvoffload redis tier: this run wrote .*?, read (\d+) \(([0-9.]+) GB\)", b["log"])
    print(f"instance B read from Redis: {read[-1][0] if read else '?'} chunks, {read[-1][1] if read else '?'} GB")


if __name__ == "__main__":
    main()
