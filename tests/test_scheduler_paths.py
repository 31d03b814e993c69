"""Fast unit tests of the scheduler's and worker's risky paths, on the harness of ``tests/harness.py``.

Each test is one way the connector could serve or keep the wrong bytes, or hang EngineCore, and fails
without its fix: a slot freed under a planned load, a chunk key asked of tokens vLLM does not know yet,
ranks that all believe they are rank 0.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from kvoffload.config import load_settings  # noqa: E402
from kvoffload.vllm.worker import OffloadWorker  # noqa: E402
from tests.harness import (BLOCK, CHUNK, HEAD, PROMPT, PROMPT_BLOCKS, Blocks, CachedRequestData, Request, SchedulerOutput,  # noqa: E402
                           TPEngine, kv_cache_config, schedule_new, store_prompt, vllm_config, wait_idle)


def test_written_out_chunk_stays_in_its_slot_while_a_planned_load_reads_it(tmp_path: Path) -> None:
    """``local_cpu: false`` drops a chunk from the pool once it is on disk, but not under a load planned from it:
    before, its slot was freed and the next store overwrote it while the load was still to run."""
    engine = TPEngine(world_size=1, local_disk=str(tmp_path), max_local_disk_size=0.01, local_cpu=False)
    engine.step()  # the workers' layout arrives: stores planned from now on are written to disk
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    shard = engine.pages(0, a_blocks)
    tier, written = engine.workers[0].tiers[0], threading.Event()
    put_many = tier.put_many
    tier.put_many = lambda items: (written.wait(10), put_many(items))[1]  # the write-out waits for the lookup
    store_prompt(engine, a, a_blocks)
    b = Request("b", PROMPT)
    need, _ = engine.scheduler.get_num_new_matched_tokens(b, 0)  # pins a's chunks for b's load
    assert need == len(PROMPT) - 1
    written.set()
    engine.scheduler.request_finished(a, a_blocks)
    engine.step(finished={"a"})
    wait_idle(engine)  # the write-out completes: local_cpu is off, so the chunks are dropped... once unpinned
    c = Request("c", [7] * len(PROMPT))  # another prompt: its stores take whatever slots are free
    store_prompt(engine, c, list(range(30, 30 + PROMPT_BLOCKS)))
    b_blocks = list(range(45, 45 + PROMPT_BLOCKS))
    engine.load_into(b, b_blocks, need)
    assert torch.equal(engine.pages(0, b_blocks).view(torch.uint8), shard.view(torch.uint8)), \
        "the load read a slot that was freed and reused"
    wait_idle(engine)
    assert all(engine.scheduler.index.get(k) is None for k in engine.keys(a)), "dropped chunks never freed"
    engine.shutdown()


def test_decode_chunk_waits_for_tokens_vllm_has_verified() -> None:
    """With ``save_decode_cache`` and async scheduling, a step computes the KV of a position whose token is still
    a placeholder (not in ``all_token_ids``): the chunk it completes is stored a step later, never keyed on
    tokens that are not there (before: an endless loop on EngineCore's thread)."""
    engine = TPEngine(world_size=1, save_decode_cache=True)
    prompt = list(range(500, 500 + 4 * CHUNK - 1))  # 3 whole chunks and a 31-token tail
    req = Request("r", prompt, max_tokens=8)
    blocks = list(range(1, 10))
    assert engine.scheduler.get_num_new_matched_tokens(req, 0) == (0, False)
    engine.scheduler.update_state_after_alloc(req, Blocks(blocks), 0)
    engine.step(schedule_new(req, blocks, 0, len(prompt)))
    # the next step computes position 127 (the first output token, not known yet: a placeholder)
    ahead = SchedulerOutput(scheduled_cached_reqs=CachedRequestData(req_ids=["r"], new_block_ids=[None],
                                                                     num_computed_tokens=[len(prompt)]),
                            num_scheduled_tokens={"r": 1})
    done = threading.Event()
    plans = []
    thread = threading.Thread(target=lambda: (plans.append(engine.scheduler.build_connector_meta(ahead)),
                                              done.set()), daemon=True)
    thread.start()
    assert done.wait(10), "build_connector_meta never returned"
    assert all(chunk.key not in engine.scheduler._requests["r"].decode_keys
               for copies in plans[0].stores for chunk in copies.chunks)
    engine.shutdown()


def test_worker_without_a_known_rank_refuses_to_guess_under_tensor_parallelism() -> None:
    """Ranks that all fell back to 0 would share one disk/Redis namespace and read each other's shards."""
    settings = load_settings({"chunk_size": CHUNK}, environ={})
    with pytest.raises(RuntimeError, match="tensor-parallel rank"):
        OffloadWorker(vllm_config(2), kv_cache_config(), settings)
    assert OffloadWorker(vllm_config(1), kv_cache_config(), settings).rank == 0


def _adapter(path: Path, value: float) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}')
    save_file({"base_model.model.q_proj.lora_A.weight": torch.full((8, 64), value)},
              str(path / "adapter_model.safetensors"))
    return path


def test_lora_adapter_is_keyed_by_its_files_not_its_name(tmp_path: Path) -> None:
    """Same adapter name, other weights (a new id, or the name pointing elsewhere after a restart): other keys.
    The same files under another path: the same keys. Files that cannot be read: the request bypasses kvoffload."""
    from vllm.lora.request import LoRARequest

    engine = TPEngine(world_size=1)
    first, other = _adapter(tmp_path / "a", 1.0), _adapter(tmp_path / "b", 2.0)
    copy = tmp_path / "copy-of-a"
    copy.mkdir()
    for file in first.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())

    def keys(req_id: str, request: LoRARequest | None) -> list[bytes] | None:
        state = engine.scheduler._state(Request(req_id, PROMPT, lora_request=request))
        return None if state is None else state.prompt_keys

    plain = keys("plain", None)
    a = keys("a", LoRARequest("support-bot", 1, str(first)))
    b = keys("b", LoRARequest("support-bot", 2, str(other)))
    a_again = keys("a2", LoRARequest("support-bot", 3, str(copy)))
    assert len({bytes(plain[0]), bytes(a[0]), bytes(b[0])}) == 3, "another adapter under the same name shares keys"
    assert a_again == a, "the same adapter files at another path must share the cache"
    assert keys("gone", LoRARequest("support-bot", 4, str(tmp_path / "missing"))) is None
    engine.shutdown()


def test_disk_listing_runs_beside_the_step_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a large disk tier takes seconds: it must not run on EngineCore's thread (it did, inside
    update_connector_output). Until it is done the lookup asks vLLM to come back; a chunk removed meanwhile
    stays removed."""
    from kvoffload.tiers import disk
    from kvoffload.vllm.persistent import PersistentLookup

    listing_may_end = threading.Event()

    def slow_listing(root: str, fingerprint: bytes) -> set[bytes]:
        listing_may_end.wait(10)
        return {b"a" * 32, b"b" * 32}

    monkeypatch.setattr(disk, "list_disk_keys", slow_listing)
    lookup = PersistentLookup(load_settings({"local_disk": str(tmp_path), "max_local_disk_size": 1}, environ={}), bytes(32))
    assert not lookup.ready, "the constructor waited for the listing"
    lookup.discard(b"b" * 32)  # a worker reported it removed (evicted, corrupt) while the listing ran
    listing_may_end.set()
    for _ in range(100):
        if lookup.ready:
            break
        threading.Event().wait(0.05)
    assert lookup.ready
    assert len(lookup.leading([b"a" * 32, b"b" * 32])) == 1
    lookup.close()


def _stored_on_disk(tmp_path: Path, **options: Any) -> tuple[TPEngine, Request, list[int]]:
    """One rank with a disk tier that stored ``PROMPT`` (request "a", finished) and wrote it out."""
    engine = TPEngine(world_size=1, local_disk=str(tmp_path), max_local_disk_size=0.01, **options)
    engine.step()  # the workers' layout arrives: stores planned from now on are written to disk
    a = Request("a", PROMPT)
    a_blocks = list(range(1, 1 + PROMPT_BLOCKS))
    store_prompt(engine, a, a_blocks)
    engine.scheduler.request_finished(a, a_blocks)
    engine.step(finished={"a"})
    wait_idle(engine)
    return engine, a, a_blocks


def test_hit_sources_name_the_tier_each_loaded_token_came_from(tmp_path: Path) -> None:
    """vLLM 0.32's ``vllm:prompt_tokens_cached_by_source`` is fed by the connector: a prefix prefetched from the
    disk tier counts as disk for the load that brought it, and as the host pool for every later load."""
    CacheHitSource = pytest.importorskip("vllm.v1.metrics.cache_hit_source").CacheHitSource  # vLLM 0.32+

    from kvoffload.vllm import compat

    engine, _, _ = _stored_on_disk(tmp_path)
    assert engine.scheduler.reset_cache()  # the host pool forgets it: only the disk tier has the prefix
    need = len(PROMPT) - 1

    def lookup(req: Request, first_block: int) -> dict:
        for _ in range(500):
            answer, _ = engine.scheduler.get_num_new_matched_tokens(req, 0)
            if answer is not None:
                break
            engine.step()
            threading.Event().wait(0.01)
        assert answer == need
        engine.load_into(req, list(range(first_block, first_block + PROMPT_BLOCKS)), need)
        return engine.scheduler.hit_sources(req)

    assert lookup(Request("b", PROMPT), 20) == {"disk": need}
    assert lookup(Request("c", PROMPT), 40) == {"host": need}
    assert compat.hit_sources({"disk": 3, "host": 5, "redis": 2}) == {
        CacheHitSource.DISK: 3, CacheHitSource.HOST: 5, CacheHitSource.EXTERNAL_UNSPECIFIED: 2}
    engine.shutdown()


def test_models_kvoffload_cannot_offload_are_refused_with_the_reason() -> None:
    """A state-space model (vLLM's ``MambaSpec``; here Mamba-2's shapes) died with an AttributeError in the model
    fingerprint; KV cache groups other than full or sliding-window attention and pipeline parallelism were refused
    by one side only. Both sides now
    refuse each at start, saying why and that the model runs without the connector."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import MambaSpec

    from kvoffload.errors import KVOffloadError, UnsupportedModel
    from kvoffload.vllm.scheduler import OffloadScheduler

    settings = load_settings({"chunk_size": CHUNK}, environ={})
    mamba = SimpleNamespace(num_blocks=8, kv_cache_groups=[SimpleNamespace(
        layer_names=["l0"], kv_cache_spec=MambaSpec(block_size=4096, shapes=((3, 160), (8, 16, 16)),
                                                    dtypes=(torch.bfloat16, torch.float32)))])
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec
    two_groups = kv_cache_config()  # a hybrid of full and chunked-local attention (Llama-4): not a sliding window
    local = ChunkedLocalAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD, dtype=torch.float32,
                                      attention_chunk_size=64)
    two_groups.kv_cache_groups = two_groups.kv_cache_groups + [SimpleNamespace(layer_names=["l2", "l3"],
                                                                              kv_cache_spec=local)]
    pipeline = vllm_config(1)
    pipeline.parallel_config.pipeline_parallel_size = 2
    for config, kv_config, reason in ((vllm_config(1), mamba, "Mamba/linear-attention state"),
                                      (vllm_config(1), two_groups, "groups include ChunkedLocalAttentionSpec"),
                                      (pipeline, kv_cache_config(), "pipeline parallelism")):
        for side in (OffloadScheduler, OffloadWorker):
            with pytest.raises(UnsupportedModel, match=reason) as refused:
                side(config, kv_config, settings)
            assert isinstance(refused.value, KVOffloadError) and "without --kv-transfer-config" in str(refused.value)


def test_kv_events_announce_each_medium_with_vllm_block_hashes(tmp_path: Path) -> None:
    """Routers match vLLM's block hashes: a stored chunk is announced as its whole blocks' hashes, on CPU once
    every rank stored it and on STORAGE once written out; an eviction from the pool removes it from CPU only."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    engine, a, a_blocks = _stored_on_disk(tmp_path, kv_events=True)
    events = engine.scheduler.take_events()
    stored = {e.medium: [] for e in events}
    for event in events:
        assert isinstance(event, BlockStored) and event.block_size == 16
        stored[event.medium].extend(event.block_hashes)
    from kvoffload.vllm.compat import external_block_hash

    # 6 whole blocks, as vLLM's events carry them; the tail's partial 7th block has no hash and is not announced
    hashes = [external_block_hash(h) for h in a.block_hashes]
    assert stored == {"CPU": hashes, "STORAGE": hashes}
    first = next(e for e in events if e.medium == "CPU")
    assert first.parent_block_hash is None and first.token_ids == PROMPT[:CHUNK]
    second = [e for e in events if e.medium == "CPU"][1]
    assert second.parent_block_hash == hashes[1] and second.token_ids == PROMPT[CHUNK:2 * CHUNK]
    assert engine.scheduler.take_events() == []
    engine.scheduler.reset_cache()  # the pool forgets them; the disk tier still has them
    removed = engine.scheduler.take_events()
    assert all(isinstance(e, BlockRemoved) and e.medium == "CPU" for e in removed)
    assert [h for e in removed for h in e.block_hashes] == hashes
    engine.shutdown()
    quiet = TPEngine(world_size=1)  # events off (vLLM's default): nothing is kept or emitted
    store_prompt(quiet, Request("a", PROMPT), a_blocks)
    wait_idle(quiet)
    assert quiet.scheduler.take_events() == [] and quiet.scheduler.events._chunks == {}
    quiet.shutdown()


def test_a_chunk_kept_with_its_state_is_removed_from_storage_under_its_state_key() -> None:
    """The disk tier reports an evicted file by the key it was written under; for a chunk kept with its Mamba/GDN
    state that is ``with_state_key(key)``, which a router never saw: the removal names the chunk's blocks."""
    from vllm.distributed.kv_events import BlockRemoved

    from kvoffload.keys import with_state_key
    from kvoffload.vllm import events
    from kvoffload.vllm.compat import external_block_hash

    chunks = events.ChunkEvents(vllm_config(1, kv_events=True), BLOCK)
    request = Request("a", PROMPT)
    plain, stated = b"p" * 32, b"s" * 32
    for key, first in ((plain, 0), (stated, CHUNK)):
        chunks.describe(key, request, first, CHUNK)
        chunks.stored(key, events.CPU)
    chunks.stored(plain, events.STORAGE, stored_as=plain)
    chunks.stored(stated, events.STORAGE, stored_as=with_state_key(stated))
    chunks.take()
    chunks.removed(stated, events.CPU)  # the pool evicts it; the disk still holds it under the state key
    chunks.removed(with_state_key(stated), events.STORAGE)
    chunks.removed(plain, events.STORAGE)
    removed = chunks.take()
    assert [(type(e), e.medium) for e in removed] == [(BlockRemoved, "CPU"), (BlockRemoved, "STORAGE"),
                                                       (BlockRemoved, "STORAGE")]
    per_block = CHUNK // BLOCK
    hashes = [external_block_hash(h) for h in request.block_hashes]
    assert removed[1].block_hashes == removed[0].block_hashes == hashes[per_block:2 * per_block]
    assert removed[2].block_hashes == hashes[:per_block]
    assert stated not in chunks._chunks and chunks._stored_as == {}  # gone from every medium: nothing kept
    chunks.removed(with_state_key(stated), events.STORAGE)  # a second report of the same file says nothing
    assert chunks.take() == []


def test_full_graph_steps_follow_vllms_cuda_graph_mode() -> None:
    """Which steps vLLM may replay as a full CUDA graph (skipping the per-layer hooks), by graph mode: none
    without full graphs, uniform decodes (one token, plus the speculative ones) in the default mode, every
    step in mode FULL."""
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from kvoffload.vllm.identity import full_graph_query_len

    def query_len(mode: CUDAGraphMode, speculative: int | None = None) -> float:
        config = vllm_config(1, cudagraph_mode=mode)
        if speculative is not None:
            config.speculative_config = SimpleNamespace(num_speculative_tokens=speculative)
        return full_graph_query_len(config)

    assert query_len(CUDAGraphMode.NONE) == query_len(CUDAGraphMode.PIECEWISE) == 0
    assert query_len(CUDAGraphMode.FULL_AND_PIECEWISE) == query_len(CUDAGraphMode.FULL_DECODE_ONLY) == 1
    assert query_len(CUDAGraphMode.FULL_AND_PIECEWISE, speculative=3) == 4
    assert query_len(CUDAGraphMode.FULL) == float("inf")


@pytest.mark.parametrize("mode, layerwise", [("NONE", True), ("PIECEWISE", True), ("FULL_AND_PIECEWISE", None)])
def test_a_load_in_a_step_vllm_may_replay_as_a_full_graph_is_held_aside(mode: str, layerwise: bool | None) -> None:
    """A prompt found whole but for its last token computes one token: with full CUDA graphs (vLLM's default)
    that step may be a graph replay that never calls ``wait_for_layer_load``, so a layer-by-layer load would be
    read before it arrived, and a whole load would run before the forward, not beside it. Its load is then
    asynchronous (``layerwise=None``: no synchronous load at all, vLLM holds the request until it is in), and
    stays synchronous, layer by layer, where the hooks run. The prompt's own store, a prefill, keeps the hooks in
    every mode."""
    from vllm.config import CUDAGraphMode

    engine = TPEngine(world_size=1, cudagraph_mode=CUDAGraphMode[mode])
    plans: list[Any] = []
    build = engine.scheduler.build_connector_meta
    engine.scheduler.build_connector_meta = lambda output: plans.append(build(output)) or plans[-1]
    try:
        store_prompt(engine, Request("first", PROMPT), list(range(1, 1 + PROMPT_BLOCKS)))
        assert plans[-1].stores and plans[-1].layer_hooks
        wait_idle(engine)
        worker = engine.workers[0]
        worker._layerwise = True  # as once a forward announced every layer
        asked: list[bool] = []
        load_sync = worker.backend.load_sync
        worker.backend.load_sync = lambda *copy_list, layerwise: asked.append(layerwise) or load_sync(
            *copy_list, layerwise=layerwise)
        blocks = engine.load_repeat("again", 1 + PROMPT_BLOCKS)
        assert asked == ([] if layerwise is None else [layerwise])
        assert engine.scheduler._requests["again"].load_async == (layerwise is None)
        engine.synchronize()
        assert torch.equal(engine.pages(0, blocks[:-1]), engine.pages(0, list(range(1, PROMPT_BLOCKS))))
    finally:
        engine.shutdown()
