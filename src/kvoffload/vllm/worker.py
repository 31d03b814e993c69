"""Worker side: executes the scheduler's plans. Copies bytes, decides nothing.

One instance per vLLM worker (GPU or TP rank). It owns the host pool, the copy backend and the worker
ends of the persistent tiers. Each step it

1. issues the planned loads from host slots into vLLM blocks, one per request, without waiting for them
   (``start_load_kv``); vLLM keeps those requests out of the batch until their load is reported. Chunks
   still in a finished request's blocks are copied block to block on the compute stream instead,
2. starts reading planned prefetches from disk/remote into host slots on background threads,
3. issues the planned stores from vLLM blocks into host slots on a side stream without waiting for them:
   layer by layer as the forward finishes each layer (``save_kv_layer``) where the copy path can, so they
   are over soon after the forward ends, and whatever is left after the forward (``wait_for_save``),
4. polls what finished and reports it (``get_finished`` / ``build_connector_worker_meta``): a request
   whose load finished is handed back to vLLM (``finished_recving``), stored chunks with a ``persist_op``
   are handed to the tier writers, and a finished request's blocks are released (``finished_sending``)
   only once every copy out of them completed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvoffload.config import Settings
from kvoffload.keys import ModelFingerprint
from kvoffload.tiers.base import ChunkTier, PutResult, TierStats
from kvoffload.tiers.host_pool import HostPool
from kvoffload.transfer import CopyBackend, Fence, make_copy_backend
from kvoffload.transfer.base import LayeredStore
from kvoffload.transfer.layout import paged_kv
from kvoffload.errors import UnsupportedModel
from kvoffload.vllm.identity import check_supported, slot_layout, slots_per_worker, storage_share
from kvoffload.vllm.persistent import storage_fingerprint
from kvoffload.vllm.plan import ChunkCopy, Prefetch, RequestCopies, StepPlan, WorkerReport
from kvoffload.vllm.stats import TIER_FIELDS, KVOffloadStats

logger = logging.getLogger("kvoffload")


@dataclass
class _Batch:
    """Copies issued together, and how to time them."""

    fence: Fence
    copies: list[RequestCopies]
    nbytes: int  # crossing PCIe
    started: float  # perf_counter at issue: the time of copies whose fence cannot time them
    sync: bool = False  # a load the step's forward waits for (not handed back through finished_recving)
    device_bytes: int = 0  # of a load, copied on the device from blocks still held (ChunkCopy.source_block_ids)


@dataclass
class _RequestStores:
    batches: list[_Batch] = field(default_factory=list)
    tokens: int = 0
    total_tokens: int = 0
    nbytes: int = 0
    seconds: float = 0.0


class OffloadWorker:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: Settings, rank: int | None = None) -> None:
        """``rank``: this worker's tensor-parallel rank; by default vLLM's (tests driving several ranks in one
        process pass it)."""
        check_supported(vllm_config, kv_cache_config)
        self.settings = settings
        self.kv_cache_config = kv_cache_config
        self.slot_layout = slot_layout(settings, kv_cache_config)
        # A sliding-window group's blocks are freed by vLLM while its request runs, as they leave the window, and so
        # is a state group's block of a boundary once the next one is written: a store still reading one must be
        # over before a later step's forward may write it (see handle_preemptions).
        self._frees_running = any(group.window is not None or group.state for group in self.slot_layout.groups)
        parallel = vllm_config.parallel_config
        self.world_size = parallel.world_size
        self.rank = _tp_rank(self.world_size) if rank is None else rank
        self.share = storage_share(vllm_config, kv_cache_config, self.rank)
        self.pool: HostPool | None = None
        self.backend: CopyBackend | None = None
        self.tiers: list[ChunkTier] = []
        self.writers: list[Any] = []
        self._prefetcher: ThreadPoolExecutor | None = None
        self._results: queue.SimpleQueue = queue.SimpleQueue()  # (op, ok, source tier) from background threads
        self._stores: list[_Batch] = []
        self._loads: list[_Batch] = []
        self._requests: dict[str, _RequestStores] = {}
        self._finishing: set[str] = set()
        self._report = WorkerReport()
        self._stats = KVOffloadStats()
        # Which parts of the bound plan ran: "load"/"store" -> the plan itself. Not its id(): once vLLM drops a
        # step's plan, the next one can get the same id, and its loads, stores and prefetches were skipped.
        self._done_plans: dict[str, StepPlan] = {}
        # Layer-wise loads need the forward to announce each layer (wait_for_layer_load); they are used only
        # once a forward was seen announcing every layer of the cache, so a model that does not is never
        # run on a layer that is not in yet.
        self._layer_index: dict[str, int] = {}
        self._layers_announced: set[str] = set()
        self._layerwise = False
        self._layered: tuple[StepPlan, LayeredStore | None] | None = None  # the step's store, issued per layer
        self._stored_by_layer = False  # whether a store was issued layer by layer yet (logged once)
        self._tier_seen: dict[str, TierStats] = {}  # each tier's stats at the last take_stats

    # ---- setup --------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], model_fingerprint: ModelFingerprint) -> None:
        tensors = _distinct_memory(list(kv_caches.values()))
        layout = self.slot_layout
        if len(tensors) != layout.num_layers:
            raise UnsupportedModel(f"kvoffload: this KV cache has {len(tensors)} distinct layer tensors for "
                                   f"{layout.num_layers} layers per KV cache group; kvoffload cannot tell which "
                                   "group owns which bytes. Run without --kv-transfer-config, or with "
                                   "--disable-hybrid-kv-cache-manager")
        # Layer-wise loads and stores need one layer name per tensor: with several groups overlaying the same
        # tensors, the forward writes a tensor once per group, so a tensor is complete only after its last
        # group's layer. Such models copy whole, before and after the forward.
        self._layer_index = {name: index for index, name in enumerate(kv_caches)} \
            if len(tensors) == len(kv_caches) else {}
        kv = paged_kv(tensors, self.kv_cache_config.num_blocks)
        slot_bytes = kv.num_layers * layout.pages_per_slot * kv.page_bytes
        num_slots = slots_per_worker(self.settings, self.world_size, slot_bytes)
        # On a GPU the pool is pinned (DMA needs it) in the background; a CPU cache copies from plain memory.
        self.pool = HostPool(num_slots, kv.num_layers, layout.pages_per_slot, kv.page_bytes,
                             pin=kv.device.type == "cuda")
        self.kv = kv
        first = tensors[0]
        self.layout = (f"{first.dtype};shape={tuple(first.shape[1:])};strides={tuple(first.stride()[1:])};"
                       f"page={kv.page_bytes};split={first.shape[0] // self.kv_cache_config.num_blocks}")
        if layout.compact:  # another slot layout: another namespace on disk/Redis (one group: as before)
            self.layout += ";groups=" + ",".join("state" if g.state else "full" if g.window is None
                                                  else f"window{g.window}:{g.num_pages}" for g in layout.groups)
        self._report.layout = self.layout
        if model_fingerprint.identified:  # else model_fingerprint() said why the disk and remote tiers stay off
            self._open_tiers(storage_fingerprint(model_fingerprint, self.layout, self.share.rank,
                                                 self.share.world_size), num_slots)
        logger.info("kvoffload: worker %d/%d: %d layers, %d-byte pages, %d slots of %.1f MB%s",
                    self.rank, self.world_size, kv.num_layers, kv.page_bytes, num_slots, slot_bytes / 1e6,
                    ", tiers: " + ", ".join(t.name for t in self.tiers) if self.tiers else "")
        logger.info("kvoffload: KV cache groups offloaded: %s", layout.describe())

    def _copy_path(self) -> CopyBackend:
        """The copy backend, created at the first copy once the host pool is ready (the CUDA path needs
        pinned memory). A GPU pool pins in the background from engine start; a copy planned before it is
        done waits for it, since a planned store must run: a load of the same chunk may already be queued."""
        if self.backend is None:
            assert self.pool is not None, "copies are planned only after register_kv_caches"
            start = time.perf_counter()
            self.pool.wait_ready()
            waited = time.perf_counter() - start
            if waited > 0.01:
                logger.info("kvoffload: the first copy waited %.2f s for the host pool to be pinned (requests "
                            "sent right after start)", waited)
            preference = self.settings.copy_backend if self.pool.pinned else "torch"
            self.backend = make_copy_backend(self.kv, self.pool.tensor, preference)
            logger.info("kvoffload: %s copy path ready", self.backend.name)
        return self.backend

    def _open_tiers(self, fingerprint: bytes, num_slots: int) -> None:
        s = self.settings
        if s.local_disk is not None:
            from kvoffload.tiers.disk import HEADER_SIZE, DiskReader, DiskTier
            disk_bytes = s.disk_bytes // self.share.world_size
            tier = DiskTier if self.share.writes else DiskReader
            self.tiers.append(tier(s.local_disk, fingerprint, disk_bytes))
            chunk_bytes = HEADER_SIZE + self.pool.tensor[0].numel() if self.pool is not None else 0
            if disk_bytes < chunk_bytes:
                logger.warning("kvoffload: max_local_disk_size (%.6f GB per worker) is smaller than one chunk "
                               "(%.6f GB): nothing will be stored on disk; raise it to use the disk tier",
                               disk_bytes / 1e9, chunk_bytes / 1e9)
        if s.remote_url is not None:
            from kvoffload.tiers.redis_tier import RedisTier
            self.tiers.append(RedisTier.from_settings(s, fingerprint))
        if self.tiers and self.share.writes:
            from kvoffload.tiers.writer import AsyncWriter
            # Queued writes hold their host slots; an eighth of the pool keeps most of it serving hits.
            self.writers = [AsyncWriter(tier, max_pending=max(4, num_slots // 8)) for tier in self.tiers]
        if self.tiers:
            self._prefetcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvoffload-prefetch")

    # ---- per step -----------------------------------------------------------------------------------

    def handle_preemptions(self, plan: StepPlan | None) -> None:
        """A preempted request's blocks are reused this very step: its stores must finish first."""
        if self._frees_running and kv_is_async(self):
            for batch in self._stores:  # see __init__: before this step's forward may write a block vLLM freed
                batch.fence.wait()
        if not isinstance(plan, StepPlan):
            return
        for req_id in plan.preempted:
            for batch in self._requests.get(req_id, _RequestStores()).batches:
                batch.fence.wait()

    def start_load_kv(self, plan: StepPlan | None) -> None:
        if not isinstance(plan, StepPlan) or self._done_plans.get("load") is plan:
            return
        self._done_plans["load"] = plan
        assert self.pool is not None
        if plan.slot_bytes and plan.slot_bytes != self.pool.tensor[0].numel():
            raise RuntimeError(f"kvoffload: scheduler and worker disagree on the chunk size in bytes "
                               f"({plan.slot_bytes} != {self.pool.tensor[0].numel()}); please report this")
        on_device = [chunk for copies in plan.loads for chunk in copies.chunks if chunk.source_block_ids]
        if on_device:  # first: the compute stream need not wait for a layer-wise load to get to them
            self._copy_path().copy_blocks(
                torch.tensor([b for chunk in on_device for b in chunk.source_block_ids], dtype=torch.int64),
                torch.tensor([b for chunk in on_device for b in chunk.block_ids], dtype=torch.int64))
        sync = [copies for copies in plan.loads if copies.sync]
        if sync:  # first, so that the forward waiting for them never waits behind an asynchronous load
            backend = self._copy_path()
            layerwise = self._layerwise and plan.layer_hooks
            batch = self._issue(sync, functools.partial(backend.load_sync, layerwise=layerwise))
            batch.sync = True
            self._loads.append(batch)
        for copies in plan.loads:  # one fence per request: each one runs as soon as its own bytes are in
            if not copies.sync:
                self._loads.append(self._issue([copies], self._copy_path().load))
        for prefetch in plan.prefetches:
            assert self._prefetcher is not None
            self._prefetcher.submit(self._prefetch, prefetch)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Called by the forward before each layer's attention: order the *next* layer's load before it, so
        the next layer's pages are in before the forward writes the new tokens' KV into the same blocks."""
        index = self._layer_index.get(layer_name)
        if index is None:
            return
        self._layers_announced.add(layer_name)
        if self.backend is not None:
            self.backend.wait_layer(index + 1)

    def save_kv_layer(self, layer_name: str, plan: StepPlan | None) -> None:
        """Called by the forward once it wrote a layer's KV: store that layer of the step's planned stores now."""
        index = self._layer_index.get(layer_name)
        if index is None or not isinstance(plan, StepPlan) or not plan.stores or self._done_plans.get("store") is plan:
            return
        if self._layered is None or self._layered[0] is not plan:
            store = self._copy_path().layered_store(*self._copy_list(plan.stores)[:3])
            if store is not None and not self._stored_by_layer:
                self._stored_by_layer = True
                logger.info("kvoffload: the forward reports each layer it wrote: stores run beside it, layer by "
                            "layer")
            self._layered = (plan, store)
        store = self._layered[1]
        if store is not None:
            store.layer(index)

    def wait_for_save(self, plan: StepPlan | None) -> None:
        if self.backend is not None:  # the forward is over: nothing after it may see a layer not yet in
            self.backend.finish_layers()
        if not self._layerwise and self._layer_index and len(self._layers_announced) == len(self._layer_index):
            self._layerwise = True
            logger.info("kvoffload: the forward announces every layer: a load with nothing queued before it now "
                        "runs beside its request's forward, layer by layer")
        if not isinstance(plan, StepPlan) or self._done_plans.get("store") is plan:
            return
        self._done_plans["store"] = plan
        layered, self._layered = self._layered, None
        if not plan.stores:
            return
        store = layered[1] if layered is not None and layered[0] is plan else None
        if store is None:
            batch = self._issue(plan.stores, self._copy_path().store)
        else:  # its layers were issued with the same copy list: what is left needs none
            batch = self._issue(plan.stores, lambda *copy_list: store.finish())
        self._stores.append(batch)
        for copies in plan.stores:
            self._requests.setdefault(copies.req_id, _RequestStores()).batches.append(batch)

    @staticmethod
    def _copy_list(copies: list[RequestCopies]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The host-slot copies of ``copies`` as a copy list, and how many blocks are copied on the device instead
        (chunks still in a finished request's blocks, copied by start_load_kv)."""
        block_ids, slots, pages = [], [], []
        on_device = 0
        for request in copies:
            for chunk in request.chunks:
                if chunk.source_block_ids:
                    on_device += len(chunk.block_ids)
                    continue
                block_ids.extend(chunk.block_ids)
                slots.extend([chunk.slot] * len(chunk.block_ids))
                pages.extend(chunk.page_list())
        return (torch.tensor(block_ids, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64),
                torch.tensor(pages, dtype=torch.int64), on_device)

    def _issue(self, copies: list[RequestCopies], op: Any) -> _Batch:
        """Issue the host-slot copies of ``copies`` with ``op`` (a store or load of a copy list)."""
        block_ids, slots, pages, on_device = self._copy_list(copies)
        started = time.perf_counter()
        fence = op(block_ids, slots, pages)
        page_bytes = self.kv.num_layers * self.kv.page_bytes
        return _Batch(fence=fence, copies=copies, nbytes=len(block_ids) * page_bytes, started=started,
                      device_bytes=on_device * page_bytes)

    def _prefetch(self, prefetch: Prefetch) -> None:
        """Read a chunk into its slot from the first tier that has it whole and verified (a thread of its own)."""
        assert self.pool is not None
        source = None
        try:
            for tier in self.tiers:
                if self.pool.fill(prefetch.slot, prefetch.num_pages,
                                  lambda out, tier=tier: tier.get_into(prefetch.key, out)):
                    source = tier.name
                    break
        except Exception as exc:  # a tier bug must not kill the engine: the request recomputes
            logger.warning("kvoffload: prefetch of a chunk failed (%s); recomputing it", exc)
        self._results.put((prefetch.op, source is not None, source))

    def drain(self) -> None:
        """Wait for every copy issued into or out of vLLM's KV cache, so that its memory may be released.

        Prefetches only fill host slots and stay in flight. The plans' bookkeeping is untouched: the finished
        copies are reported at the next ``get_finished`` as usual."""
        if self.backend is not None:
            self.backend.fence().wait()

    # ---- completion ---------------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str],
                     plan: StepPlan | None) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose blocks may be freed, requests whose load finished)."""
        # On steps where vLLM ran no forward, make sure the bound plan still ran.
        self.start_load_kv(plan)
        self.wait_for_save(plan)
        loaded = self._poll_loads()
        self._poll_stores()
        self._drain_results()
        for req_id in finished_req_ids:
            if req_id in self._requests:
                self._finishing.add(req_id)
        done: set[str] = set()
        for req_id in list(self._finishing):
            record = self._requests[req_id]
            if all(batch.fence.done() for batch in record.batches):
                done.add(req_id)
                self._finishing.discard(req_id)
                del self._requests[req_id]
                if record.tokens:
                    logger.info("Storing KV cache for %d out of %d tokens for request %s (%.1f MB, %.2f GB/s)",
                                record.tokens, record.total_tokens, req_id, record.nbytes / 1e6,
                                record.nbytes / record.seconds / 1e9 if record.seconds else 0.0)
        return (done or None), (loaded or None)

    @staticmethod
    def _seconds(batch: _Batch) -> float:
        seconds = batch.fence.seconds()
        return max(seconds if seconds is not None else time.perf_counter() - batch.started, 1e-9)

    def _poll_loads(self) -> set[str]:
        """Requests whose loads finished since the last poll (loads complete in issue order)."""
        finished: set[str] = set()
        while self._loads and self._loads[0].fence.done():
            batch = self._loads.pop(0)
            seconds = self._seconds(batch)
            if batch.nbytes:
                self._stats.add("loaded_bytes", batch.nbytes)
                self._stats.add("load_seconds", seconds)
            for copies in batch.copies:
                if not batch.sync:
                    finished.add(copies.req_id)
                for chunk in copies.chunks:
                    self._report.done[chunk.op] += 1
            total_tokens = sum(c.num_tokens for c in batch.copies)
            for copies in batch.copies:
                share = copies.num_tokens / total_tokens if total_tokens else 0
                logger.info("Loaded KV cache for %d tokens of request %s (%s)", copies.num_tokens, copies.req_id,
                            _load_figures(batch, share, seconds))
        return finished

    def _poll_stores(self) -> None:
        assert self.pool is not None
        while self._stores and self._stores[0].fence.done():
            batch = self._stores.pop(0)
            seconds = self._seconds(batch)
            self._stats.add("stored_bytes", batch.nbytes)
            self._stats.add("store_seconds", seconds)
            pages_total = sum(len(ch.block_ids) for c in batch.copies for ch in c.chunks) or 1
            for copies in batch.copies:
                record = self._requests.get(copies.req_id)
                pages = sum(len(ch.block_ids) for ch in copies.chunks)
                if record is not None:
                    record.tokens += copies.num_tokens
                    record.total_tokens = copies.total_tokens
                    record.nbytes += batch.nbytes * pages // pages_total
                    record.seconds += seconds * pages / pages_total
                for chunk in copies.chunks:
                    self._report.done[chunk.op] += 1
                    if chunk.persist_op is not None:
                        self._persist(chunk)

    def _persist(self, chunk: ChunkCopy) -> None:
        """Hand a stored chunk to every tier's writer; its write-out is done (ok if any tier stored it) when the
        last writer called back."""
        assert self.pool is not None and chunk.persist_op is not None
        op = chunk.persist_op
        if not self.share.writes:  # rank 0 writes the one copy (see storage_share); its outcome decides
            self._results.put((op, True, None))
            return
        payload = self.pool.payload(chunk.slot, chunk.num_pages)
        outcomes: list[PutResult] = []
        lock = threading.Lock()  # writers of two tiers may finish at once: report the chunk exactly once

        def done(result: PutResult) -> None:
            with lock:
                outcomes.append(result)
                last = len(outcomes) == len(self.writers)
            if last:
                self._results.put((op, PutResult.STORED in outcomes, None))

        for writer in self.writers:
            writer.submit(chunk.key, payload, done)

    def _drain_results(self) -> None:
        while True:
            try:
                op, ok, source = self._results.get_nowait()
            except queue.Empty:
                break
            (self._report.done if ok else self._report.failed)[op] += 1
            if source is not None:
                self._report.sources[op] = source
        for tier in self.tiers:
            self._report.removed.update(tier.drain_removed())

    def build_report(self) -> WorkerReport | None:
        self._drain_results()
        report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def take_stats(self) -> KVOffloadStats | None:
        """This worker's counters since the last call, each persistent tier's included (as deltas)."""
        for tier in self.tiers:
            current = dataclasses.replace(tier.stats)  # a snapshot: writer and prefetch threads update it
            seen = self._tier_seen.get(tier.name, TierStats())
            for name, attr in TIER_FIELDS.items():
                delta = getattr(current, attr) - getattr(seen, attr)
                if delta:
                    self._stats.add(f"{tier.name}_{name}", delta)
            self._tier_seen[tier.name] = current
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KVOffloadStats()
        return stats

    def shutdown(self) -> None:
        """Finish every store and write what was queued before exiting, so a restart finds it on disk.

        vLLM calls this from the worker's shutdown when the engine exits (``ensure_kv_transfer_shutdown``).
        Stores whose copy finished but which were not polled yet are handed to the writers first: the last
        steps' chunks would otherwise be lost although their bytes are already in the pool.
        """
        for batch in self._stores:
            batch.fence.wait()
        if self.pool is not None:
            self._poll_stores()
        queued = sum(writer.pending() for writer in self.writers)
        start = time.perf_counter()
        for writer in self.writers:
            writer.close()
        for tier in self.tiers:
            stats = tier.stats
            logger.info("kvoffload %s tier: this run wrote %d chunks (%.3f GB), read %d (%.3f GB), skipped %d "
                        "writes, evicted %d, %d errors, %d corrupt entries removed", tier.name, stats.writes,
                        stats.bytes_written / 1e9, stats.hits, stats.bytes_read / 1e9, stats.skipped_writes,
                        stats.evictions, stats.errors, stats.corrupt)
        if queued:
            logger.info("kvoffload: wrote the %d queued chunks out before exiting (%.2f s)", queued,
                        time.perf_counter() - start)
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
        if self.backend is not None:
            self.backend.close()
        if self.pool is not None:
            self.pool.close()


def kv_is_async(worker: OffloadWorker) -> bool:
    """Whether this worker's copies may still run after the call that issued them (a GPU cache)."""
    return getattr(worker, "kv", None) is not None and worker.kv.device.type == "cuda"


def _distinct_memory(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The layer tensors of distinct memory, in order. With vLLM's hybrid KV cache manager the layers of
    different groups are views of the same memory (a block id belongs to one group at a time), so each memory
    tensor is copied once per block, for whichever group owns the block.

    Views of one memory are told by where they start and their block stride in bytes: a Mamba layer's view
    (vLLM 0.32+: int8 ``[blocks, 1, 1, state bytes]``) covers only the state, not the padding up to the
    attention page, so of such views the one with the largest block is kept: its pages are whole."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    for tensor in tensors:
        key = (tensor.data_ptr(), tensor.stride(0) * tensor.element_size())
        if key not in out or _block_bytes(tensor) > _block_bytes(out[key]):
            out[key] = tensor
    return list(out.values())


def _block_bytes(tensor: torch.Tensor) -> int:
    return tensor[0].numel() * tensor.element_size()


def _load_figures(batch: _Batch, share: float, seconds: float) -> str:
    """Size and speed of a request's share of a load batch, for its log line."""
    over_pcie = f"{batch.nbytes * share / 1e6:.1f} MB, {batch.nbytes / seconds / 1e9:.2f} GB/s"
    if not batch.device_bytes:
        return over_pcie
    in_place = f"{batch.device_bytes * share / 1e6:.1f} MB copied within the KV cache from a finished request's blocks"
    return f"{in_place}, {over_pcie} from the host pool" if batch.nbytes else in_place


def _tp_rank(world_size: int) -> int:
    """This worker's tensor-parallel rank. Without vLLM's parallel state only a single worker may assume 0:
    ranks that all took 0 would share one disk/Redis namespace and read each other's shards."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()
    except Exception as exc:
        if world_size == 1:  # not initialised: one worker (unit tests driving the worker directly)
            return 0
        raise RuntimeError(f"kvoffload: cannot read this worker's tensor-parallel rank ({exc}) with {world_size} "
                           "workers; please report this with your vLLM version") from exc

