"""Scheduler side: decides what to load, store and prefetch. Never touches KV bytes.

How it is built: every copy it plans is an operation (:class:`_Op`) with an id, holding a pin on the
:class:`~kvoffload.tiers.host_index.Entry` it reads or fills from the moment it is planned until every
worker reported it, done or failed; the index fills a slot by prepare and complete(ok). A lookup is a pure
decision (:meth:`OffloadScheduler._decide`: miss, ask again, fetch, hit) that the caller then carries out.
So the invariants hold by construction: no slot is freed or overwritten while an operation or a promised
load uses it, and an operation completes exactly once, whatever the number of ranks or of requests that
want the same chunk.

Runs inside vLLM's EngineCore process. It answers vLLM's question "how many prompt tokens can you
provide?" from its :class:`~kvoffload.tiers.host_index.HostIndex` (and, for prefixes on disk or in
Redis, by starting a prefetch into the host pool and answering "ask me again"), and each step turns
vLLM's scheduler output into a :class:`~kvoffload.vllm.plan.StepPlan` for the workers: which blocks to
copy to which slots (stores), which slots to copy into which blocks (loads), which chunks to read from
the persistent tiers (prefetches).

What may be promised to vLLM: a chunk in the host pool (READY), or one whose store is already in a plan
the workers received (STORING). A planned store always runs (a worker whose host pool is still being
pinned right after start waits for it), and the workers order a load from a slot behind the store into
it, on the device, chunk by chunk. A chunk read from disk or Redis (PREFETCHING) becomes loadable only once every
worker reported it read and verified.

Where a load reads from: the host slot, except while the chunk is still in the vLLM blocks of a finished
request that vLLM keeps for its stores (``request_finished`` returned True and ``finished_sending`` has not
come back): then the workers copy those blocks on the device. A prompt sent again right after the first
finished is loaded in milliseconds, without crossing PCIe and without waiting behind the stores of the same
bytes. It is safe although vLLM may free those blocks one step after this plan (the workers' report can
overtake it): the copy is queued on the compute stream before anything a later step puts into them.

How a load runs: synchronously, in the step that also runs the request's forward, layer by layer (the
forward's layer *l* waits only for layer *l*), so the load hides behind the forward; or asynchronously:
vLLM keeps the request aside until the workers report its load finished and runs the other requests
meanwhile. Synchronously when nothing would wait for it but requests that need their own loads anyway:
no running request has tokens left to compute (every load of the step then runs with the step's one
forward, and the GPU blocks are free again right after it, with no step spent waiting for a report), or
no other load is in flight (the running requests' forward waits for one load at most). Asynchronously
otherwise, and always while an asynchronous load is in flight, so that no forward waits behind a queue
of loads. Also asynchronously when the request leaves no more tokens to compute than a step vLLM may replay as
a full CUDA graph (a prompt found whole, with vLLM's default graphs: ``identity.full_graph_query_len``): such a
forward cannot wait for a load layer by layer, so a synchronous load would run before it, not beside it; held
aside, the load runs beside the forwards of the requests loaded before it. Measured on an H100, the seed
script's second pass (ten prompts found whole) took 0.337 s this way, 0.343 s synchronously, and 0.340 s with the
hit one token shorter so that vLLM ran those steps piecewise and the loads went layer by layer: all within
run-to-run noise, so how these loads run is not what keeps that pass 1.2x above its PCIe floor (docs: benchmarks).

Models of several KV cache groups (vLLM's hybrid KV cache manager: full and sliding-window attention layers):
a chunk keeps one key (its token prefix) and one slot, in which every group has its own pages
(:class:`~kvoffload.vllm.identity.SlotLayout`). A store lists each group's blocks of the chunk that the slot keeps
(a sliding-window group's pages of the window at the chunk's end, the only ones still allocated), a load each
group's blocks vLLM allocated for the hit (a sliding-window group's blocks below the window are vLLM's null
block and are left alone). Each copy-list entry names a block and a slot page, and the workers copy every layer
tensor of it: the groups' layers overlay the same tensors, so a block holds exactly its group's KV.

Mamba / Gated-DeltaNet hybrids (a state group beside attention groups, vLLM's align mode): a recurrent state
cannot be cut at any token, only resumed from where vLLM kept it. vLLM keeps the state after a step's last token,
at block boundaries, and names that block each step (``kvoffload.vllm.compat.boundary_states``). A chunk whose end
is such a boundary stores that block as its state page (``Entry.has_state``); a hit then ends at the last chunk of
the run that has one, and its load writes the state into the one Mamba block vLLM allocates for the hit. Those
loads are asynchronous: vLLM copies a hit's state into the request's running block before the step's forward and
before a connector's ``start_load_kv`` (``preprocess_mamba``), so the state must be in before the request runs. A
prompt's last, partial chunk is not stored: a hit never ends there. On disk and in Redis a chunk kept with its
state has a key of its own (``keys.with_state_key``), so a lookup knows from existence alone where a hit read back
may end; a chunk first stored without its state is stored again when a later step names that state.

How much one step loads: with asynchronous scheduling vLLM plans step *N+1* while step *N* runs, so the loads
it admits then queue right behind step *N*'s on the copy engine, which stays busy across the step boundary.
That needs free GPU blocks while step *N*'s loads hold theirs: the loads admitted in one step take at most
half of vLLM's blocks (the first load of a step is admitted whatever its size); a request beyond that is
asked back the next step. Without it a burst of long cached prompts is loaded in waves that fill the whole
cache, and the copy engine idles at every wave's end while vLLM frees, schedules and prepares the next one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from kvoffload.config import Settings
from kvoffload.keys import chunk_keys, request_namespace, with_state_key
from kvoffload.tiers.host_index import HOST, Entry, HostIndex, SlotState
from kvoffload.vllm import compat, events
from kvoffload.vllm.events import ChunkEvents
from kvoffload.vllm.identity import (
    adapter_digest,
    check_supported,
    full_graph_query_len,
    model_fingerprint,
    slot_layout,
    slots_per_worker,
    storage_share,
)
from kvoffload.vllm.persistent import PersistentLookup, storage_fingerprint
from kvoffload.vllm.plan import ChunkCopy, Prefetch, RequestCopies, StepPlan, WorkerReport
from kvoffload.vllm.stats import KVOffloadStats

logger = logging.getLogger("kvoffload")

PREFETCH_TIMEOUT_S = 30.0  # a request waits at most this long for its prefix to come from disk/remote
#: How long a request whose prefix is on disk/remote waits for host-pool room to prefetch into. Other
#: requests' loads free slots within a few steps; a pool that stays full means recomputing is faster.
PREFETCH_ROOM_WAIT_S = 2.0


class OpKind(Enum):
    STORE = "store"  # vLLM blocks -> host slot (a device copy: reported done; failure would kill the worker)
    PERSIST = "persist"  # host slot -> disk/Redis, after its store (fails when no tier took it)
    LOAD = "load"  # host slot (or a finished request's blocks) -> a request's blocks
    PREFETCH = "prefetch"  # disk/Redis -> host slot (fails when no tier has the chunk whole and verified)


@dataclass(eq=False)
class _Op:
    """One planned copy: pins its entry from planning until every worker reported it."""

    kind: OpKind
    entry: Entry
    done: int = 0  # ranks that reported it done
    failed: int = 0  # ranks that reported it failed
    source: str | None = None  # of a prefetch: the tier that served it


class Answer(Enum):
    MISS = "miss"  # nothing to load: vLLM computes the prompt
    ASK_AGAIN = "ask again"  # the answer will be better in a step or two: vLLM asks again
    WAIT = "wait"  # the next chunks are being prefetched for another request: wait for them, once
    FETCH = "fetch"  # start prefetching the rest of the prefix from disk/remote
    HIT = "hit"  # load the leading chunks from the host pool


@dataclass(frozen=True)
class Decision:
    answer: Answer
    entries: tuple[Entry, ...] = ()  # the leading chunks a load may be planned from
    hit_tokens: int = 0


@dataclass
class _Request:
    request: Any
    namespace: bytes
    prompt_keys: list[bytes]  # keys of the prompt's whole chunks
    tail_key: bytes | None  # key of the prompt's last, partial chunk
    decode_keys: list[bytes] = field(default_factory=list)  # whole chunks beyond the prompt
    block_ids: list[list[int]] = field(default_factory=list)  # per KV cache group, in token order
    next_chunk: int = 0
    tail_done: bool = False
    stored_any: bool = False
    hit: tuple[int, int, tuple[Entry, ...]] | None = None  # (first, end) tokens promised to vLLM, from entries
    pinned: list[Entry] = field(default_factory=list)  # held from a lookup until the next one or the load
    waiting: set[Entry] = field(default_factory=set)  # entries being prefetched that this request waits for
    wait_deadline: float = 0.0
    prefetch_open: bool = True  # the persistent tiers may still be asked for the rest of the prefix
    prefetch_deadline: float = 0.0  # until when it may wait for room in the host pool to prefetch into
    # Per chunk of the chain, from the first, while on disk/remote: whether with its state (asked once per request;
    # False for chunks the host pool had then).
    persisted: list[bool] | None = None
    answer: tuple[int, int] | None = None  # (hit, need) of the last lookup, logged once vLLM admits the request
    load_async: bool = False  # how the promised load runs (see the module docstring)
    waited: bool = False
    # chunk -> per KV cache group {chunk page: block} of the stores planned (what a finished request may hold)
    stored_blocks: dict[bytes, list[dict[int, int]]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)  # tokens of the planned load by origin (Entry.origin)

    @property
    def chain(self) -> list[bytes]:
        return self.prompt_keys + ([self.tail_key] if self.tail_key else [])


class OffloadScheduler:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: Settings) -> None:
        check_supported(vllm_config, kv_cache_config)
        self.settings = settings
        self.layout = slot_layout(settings, kv_cache_config)
        self.block_size = self.layout.block_size
        self.chunk_size = self.layout.chunk_tokens
        self.pages_per_chunk = self.layout.pages_per_chunk
        self.world_size = vllm_config.parallel_config.world_size
        self.share = storage_share(vllm_config, kv_cache_config, rank=0)  # the namespace the lookups name
        self.slot_bytes = self.layout.slot_bytes
        num_slots = slots_per_worker(settings, self.world_size, self.slot_bytes)
        self.fingerprint = model_fingerprint(vllm_config, kv_cache_config)
        self.events = ChunkEvents(vllm_config, self.block_size)
        self.index = HostIndex(num_slots, on_remove=lambda entry: self.events.removed(entry.key, events.CPU))
        self.persistent: PersistentLookup | None = None
        self._persistent_deadline: float | None = None  # see _awaiting_persistent
        self._persistent_gave_up = False
        self._requests: dict[str, _Request] = {}
        # Chunks still in the blocks of finished requests that vLLM keeps for their stores: key -> (request,
        # per group {chunk page: block}), and request -> keys, until the request comes back in finished_sending.
        self._held: dict[bytes, tuple[str, list[dict[int, int]]]] = {}
        self._held_keys: dict[str, list[bytes]] = {}
        self._ops: dict[int, _Op] = {}  # planned and not yet reported by every worker
        self._next_op = 0
        self._in_flight = {kind: 0 for kind in OpKind}
        self._loads: list[RequestCopies] = []  # admitted since the last plan
        self._prefetches: list[Prefetch] = []
        self._async_loads: set[str] = set()  # requests whose asynchronous load vLLM has not been handed back
        self._running: set[str] = set()  # requests in a planned step and not finished or preempted since
        # Blocks the loads admitted in one step may fill (see the module docstring).
        self._step_load_cap = kv_cache_config.num_blocks // 2 if vllm_config.scheduler_config.async_scheduling \
            else None
        self._full_graph_query_len = full_graph_query_len(vllm_config)
        self._evictions_seen = 0
        self.stats = KVOffloadStats()
        logger.info("kvoffload: host pool of %d chunk slots (%.2f GB per worker, %d tokens per chunk, "
                    "%d workers)", num_slots, num_slots * self.slot_bytes / 1e9, self.chunk_size, self.world_size)

    # ---- operations ---------------------------------------------------------------------------------

    def _start(self, kind: OpKind, entry: Entry) -> int:
        """Plan an operation on ``entry``; it holds a pin on it until it completes."""
        op_id = self._next_op
        self._next_op += 1
        self.index.pin(entry)
        self._ops[op_id] = _Op(kind, entry)
        self._in_flight[kind] += 1
        return op_id

    def _complete(self, op: _Op) -> None:
        """Every worker reported ``op``: apply its outcome (failed if any rank failed), then release its pin."""
        ok, entry = op.failed == 0, op.entry
        self._in_flight[op.kind] -= 1
        if op.kind is OpKind.STORE:
            self.index.complete(entry, ok)
            self.stats.add("stored_chunks", 1)
            self.events.stored(entry.key, events.CPU)
        elif op.kind is OpKind.LOAD:
            self.stats.add("loaded_chunks", 1)
        elif op.kind is OpKind.PERSIST:
            self.stats.add("persisted_chunks" if ok else "persist_failures", 1)
            if ok and self.persistent is not None:
                self.persistent.add(self._tier_key(entry))
                self.events.stored(entry.key, events.STORAGE, stored_as=self._tier_key(entry))
            if not self.settings.local_cpu:
                self.index.drop(entry)  # freed once no load reads it any more
        else:
            if ok:
                entry.origin = op.source or HOST
            elif self.persistent is not None:
                self.persistent.discard(self._tier_key(entry))
                self.events.removed(entry.key, events.STORAGE)
            self.index.complete(entry, ok)
            if ok:
                self.events.stored(entry.key, events.CPU)
            else:
                self.events.forget(entry.key)
            self.stats.add("prefetched_chunks" if ok else "prefetch_failures", 1)
        self.index.unpin(entry)

    # ---- lookup -------------------------------------------------------------------------------------

    def _state(self, request: Any) -> _Request | None:
        state = self._requests.get(request.request_id)
        if state is not None:
            return state
        if request.mm_features or getattr(request, "prompt_embeds", None) is not None:
            return None  # token ids are placeholders for images/embeddings: a key could not prove anything
        lora = getattr(request, "lora_request", None)
        adapter = adapter_digest(lora) if lora is not None else None
        if lora is not None and adapter is None:
            return None  # an adapter that cannot be identified: its KV could be another adapter's
        namespace = request_namespace(self.fingerprint, request.cache_salt, adapter)
        keys = chunk_keys(namespace, request.prompt_token_ids, self.chunk_size)
        whole = request.num_prompt_tokens // self.chunk_size
        state = _Request(request=request, namespace=namespace, prompt_keys=keys[:whole],
                         tail_key=keys[whole] if len(keys) > whole else None)
        self._requests[request.request_id] = state
        return state

    def _decide(self, state: _Request, num_computed_tokens: int) -> Decision:
        """What to answer vLLM for this request now. Reads the index and the request; changes nothing."""
        if any(self._prefetching(e) for e in state.waiting) and time.monotonic() < state.wait_deadline:
            return Decision(Answer.ASK_AGAIN)  # keeps its pins: what arrived must still be there when it is done
        chain = state.chain
        entries = self._leading_loadable(chain)
        if len(entries) < len(chain):
            following = self.index.get(chain[len(entries)])
            if following is not None and self._prefetching(following) and not state.waited:
                # Being prefetched for another request with the same prefix: the bytes arrive within
                # milliseconds, far sooner than recomputing them.
                return Decision(Answer.WAIT, entries)
            if self.persistent is not None and state.prefetch_open:
                return Decision(Answer.FETCH, entries)
        request = state.request
        if self.layout.has_state:  # end on the last chunk whose state is stored, before the token vLLM computes
            limit = min(len(entries), min(request.num_prompt_tokens, request.num_tokens - 1) // self.chunk_size)
            entries = entries[:next((k for k in range(limit, 0, -1) if entries[k - 1].has_state), 0)]
        hit_tokens = min(len(entries) * self.chunk_size, request.num_prompt_tokens, request.num_tokens - 1)
        if hit_tokens <= num_computed_tokens:
            return Decision(Answer.MISS, entries, hit_tokens)
        if not self._fits_this_step(num_computed_tokens, hit_tokens):
            return Decision(Answer.ASK_AGAIN)
        return Decision(Answer.HIT, entries, hit_tokens)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        if state is None:
            return 0, False
        if self._awaiting_persistent():  # not part of the decision: it starts its own deadline
            return None, False
        decision = self._decide(state, num_computed_tokens)
        if decision.answer is Answer.ASK_AGAIN:
            return None, False
        state.waiting.clear()
        self._release(state)
        if decision.answer is Answer.WAIT:
            state.waited = True
            state.waiting = {e for key in state.chain[len(decision.entries):]
                             if (e := self.index.get(key)) is not None and self._prefetching(e)}
            state.wait_deadline = time.monotonic() + PREFETCH_TIMEOUT_S
            return None, False
        if decision.answer is Answer.FETCH:
            if self._start_prefetch(state, list(decision.entries)):
                return None, False
            self._release(state)
            # Nothing to fetch and prefetching closed for this request: decide again on what is here.
            return self.get_num_new_matched_tokens(request, num_computed_tokens)
        need = max(decision.hit_tokens - num_computed_tokens, 0)
        state.answer = (decision.hit_tokens, need)
        if decision.answer is not Answer.HIT:
            state.hit = None
            return 0, False
        full_graph = request.num_tokens - decision.hit_tokens <= self._full_graph_query_len
        state.load_async = self.layout.has_state or full_graph or bool(self._async_loads) or (
            self._in_flight[OpKind.LOAD] > 0 and any(self._will_compute(req_id) for req_id in self._running))
        first, last = num_computed_tokens // self.chunk_size, math.ceil(decision.hit_tokens / self.chunk_size)
        loaded = decision.entries[first:last]
        for entry in loaded:  # held until the load is planned (it then holds its own pins) or given up
            self.index.pin(entry)
            self.index.touch(entry)
        state.pinned = list(loaded)
        state.hit = (num_computed_tokens, decision.hit_tokens, loaded)
        return need, state.load_async

    def _fits_this_step(self, first_token: int, end_token: int) -> bool:
        """Whether a load of these tokens may join the loads admitted since the last plan (see the module
        docstring)."""
        if self._step_load_cap is None or not self._loads:
            return True
        admitted = sum(len(chunk.block_ids) for copies in self._loads for chunk in copies.chunks)
        blocks = math.ceil(end_token / self.block_size) - first_token // self.block_size
        return admitted + blocks <= self._step_load_cap

    def _will_compute(self, req_id: str) -> bool:
        """Whether a running request has tokens left to compute (a synchronous load would hold up its forward).

        With async scheduling vLLM plans a step before the previous step's outputs come back, so a request
        that was just given its last token is still running then; vLLM does not schedule it again, and it
        holds up no one. Unknown requests count as computing."""
        state = self._requests.get(req_id)
        request = state.request if state is not None else None
        max_tokens = getattr(request, "max_tokens", None)
        if max_tokens is None:
            return True
        return request.num_computed_tokens + 1 < request.num_prompt_tokens + max_tokens

    def _leading_loadable(self, chain: list[bytes]) -> tuple[Entry, ...]:
        """The entries of the chain's leading chunks that a load may be planned from: READY, or STORING (see
        the module docstring)."""
        entries = []
        for key in chain:
            entry = self.index.get(key)
            if entry is None or entry.state is SlotState.PREFETCHING:
                break
            entries.append(entry)
        return tuple(entries)

    @staticmethod
    def _prefetching(entry: Entry) -> bool:
        return entry.indexed and entry.state is SlotState.PREFETCHING

    def _awaiting_persistent(self) -> bool:
        """True while the disk/remote index cannot be opened yet: the lookup must wait for it.

        Its name depends on the workers' KV layout, which arrives with their first report, one step after
        the first lookup. Answering that lookup without it would recompute a prefix that is on disk (every
        restart would miss on its first request), so vLLM is asked to come back, also while the disk directory
        is being listed (on a thread of its own); the wait is bounded in case no report ever comes.
        """
        if (self.persistent is not None and self.persistent.ready) or not self._wants_persistence():
            return False
        if self._persistent_deadline is None:
            self._persistent_deadline = time.monotonic() + PREFETCH_TIMEOUT_S
        if time.monotonic() < self._persistent_deadline:
            return True
        if not self._persistent_gave_up:
            self._persistent_gave_up = True
            logger.warning("kvoffload: the disk and remote tiers were not ready within %.0f s (no worker reported "
                           "its KV layout, or the disk listing is slow); serving without them until they are",
                           PREFETCH_TIMEOUT_S)
        return False

    def _start_prefetch(self, state: _Request, have: list[Entry]) -> bool:
        """Read the chunks after the host-pool hit ``have`` from disk/remote; True if the request must wait.

        The request pins its ready prefix and the slots it prefetches into until its next lookup: with a
        pool smaller than what the waiting requests prefetch, their allocations would otherwise evict each
        other's chunks before any request could load them, and every one would recompute. When the pool
        has no room for the rest, the request waits (bounded) for other requests' loads to free slots.
        """
        assert self.persistent is not None
        now = time.monotonic()
        if not state.prefetch_deadline:
            state.prefetch_deadline = now + PREFETCH_ROOM_WAIT_S
        for entry in have:  # our own allocations below must not evict the prefix we already have
            self.index.pin(entry)
            state.pinned.append(entry)
        first = len(have)
        candidates = state.chain[first:]
        if state.persisted is None:  # retries reuse the answer: a Redis round trip per step would add up
            state.persisted = [False] * first + self.persistent.leading(candidates, self.layout.has_state)
        end = len(state.persisted)
        if self.layout.has_state:  # what follows the last chunk kept with its state cannot be part of a hit
            end = next((k for k in range(end, first, -1) if state.persisted[k - 1]), first)
        present = max(end - first, 0)
        short = 0  # chunks present on disk/remote that found no free slot
        for position, key in enumerate(candidates[:present]):
            entry = self.index.get(key)
            if entry is not None:
                if self._prefetching(entry):
                    state.waiting.add(entry)
                continue
            index = first + position
            num_pages = self.layout.payload_pages(math.ceil(self._chunk_tokens(state, index) / self.block_size))
            entry = self.index.prepare(key, num_pages, SlotState.PREFETCHING)
            if entry is None:
                short = present - position
                break
            entry.has_state = state.persisted[index]
            self.events.describe(key, state.request, index * self.chunk_size,
                                 min(self.chunk_size, state.request.num_prompt_tokens - index * self.chunk_size))
            self.index.pin(entry)
            state.pinned.append(entry)
            self._prefetches.append(Prefetch(op=self._start(OpKind.PREFETCH, entry), key=self._tier_key(entry),
                                             slot=entry.slot, num_pages=num_pages))
            state.waiting.add(entry)
        # Retry on a later lookup only while other requests hold slots that their loads will free.
        state.prefetch_open = (short > 0 and now < state.prefetch_deadline
                               and len(state.pinned) < self.index.num_slots)
        state.wait_deadline = now + PREFETCH_TIMEOUT_S
        return bool(state.waiting) or state.prefetch_open

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        if state.answer is not None:  # counted here, once: vLLM asks again while it cannot admit the request
            hit_tokens, need = state.answer
            state.answer = None
            self.stats.add("lookup_requests", 1)
            self.stats.add("lookup_tokens", request.num_prompt_tokens)
            self.stats.add("hit_tokens", hit_tokens)
            logger.info("Reqid: %s, Total tokens %d, kvoffload hit tokens: %d, need to load: %d",
                        request.request_id, request.num_tokens, hit_tokens, need)
        if num_external_tokens == 0 or state.hit is None:
            self._release(state)
            return
        first_token, end_token, entries = state.hit
        state.hit = None
        group_blocks = blocks.get_block_ids()
        first_block, end_block = first_token // self.block_size, math.ceil(end_token / self.block_size)
        first_chunk = first_block // self.pages_per_chunk
        copies: list[ChunkCopy] = []
        state.sources = {}
        for position, entry in enumerate(entries):
            if entry.state is SlotState.PREFETCHING:  # pinned since the lookup, promised only READY/STORING
                raise RuntimeError(f"kvoffload: a chunk of request {request.request_id} was promised before its "
                                   "prefetch completed; please report this")
            base = (first_chunk + position) * self.pages_per_chunk
            first, end = max(first_block, base) - base, min(end_block, base + self.pages_per_chunk) - base
            held = self._held.get(entry.key)
            block_ids, pages, sources = self._load_pages(state, group_blocks, first_chunk + position, first, end,
                                                         held[1] if held else None,
                                                         with_state=position == len(entries) - 1)
            copies.append(ChunkCopy(op=self._start(OpKind.LOAD, entry), slot=entry.slot, block_ids=block_ids,
                                    first_page=pages[0] if pages else first, num_pages=entry.num_pages,
                                    source_block_ids=sources,
                                    pages=pages if self.layout.compact else None))
            chunk_start = (first_chunk + position) * self.chunk_size
            tokens = min(end_token, chunk_start + self.chunk_size) - max(first_token, chunk_start)
            state.sources[entry.origin] = state.sources.get(entry.origin, 0) + tokens
            entry.origin = HOST  # from now on these bytes are in the host pool
        self._loads.append(RequestCopies(req_id=request.request_id, chunks=copies,
                                         num_tokens=end_token - first_token, total_tokens=request.num_tokens,
                                         sync=not state.load_async))
        if state.load_async:
            self._async_loads.add(request.request_id)
        self._release(state)  # the loads hold their own pins now

    def _chunk_tokens(self, state: _Request, index: int) -> int:
        """Tokens of chunk ``index`` of the request's chain (a prompt's last chunk may be partial)."""
        return min(self.chunk_size, state.request.num_prompt_tokens - index * self.chunk_size) \
            if index >= len(state.prompt_keys) else self.chunk_size

    def _load_pages(self, state: _Request, group_blocks: Any, index: int, first: int, end: int,
                    held: list[dict[int, int]] | None,
                    with_state: bool) -> tuple[list[int], list[int], list[int] | None]:
        """The blocks to fill from chunk ``index``'s slot (pages ``first`` to ``end`` of the chunk), every KV cache
        group's one after the other, their slot pages, and the held blocks to copy them from instead (or None).

        A state group is loaded only from the hit's last chunk (``with_state``), into the block vLLM allocated at
        the hit's end; its other blocks are the null block.

        A sliding-window group gets only the blocks vLLM allocated: those below the window of the load's next token
        are vLLM's null block, never written (kvoffload.vllm.compat.NULL_BLOCK_ID). What it did allocate is within
        the pages stored for the chunk (``GroupSlot.stored_pages``); anything else would load bytes that were
        never stored, so it is refused loudly."""
        chunk_tokens = self._chunk_tokens(state, index)
        chunk_pages = math.ceil(chunk_tokens / self.block_size)
        base = index * self.pages_per_chunk
        block_ids: list[int] = []
        pages: list[int] = []
        sources: list[int] | None = [] if held is not None else None
        for group in self.layout.groups:
            ids = group_blocks[group.group]
            stored = group.stored_pages(chunk_pages, chunk_tokens, self.block_size)
            if group.state and not with_state:
                continue
            for page in range(stored.start if group.state else first, end):
                block = ids[base + page]
                if group.window is not None and block == compat.NULL_BLOCK_ID:
                    continue
                if page not in stored or (group.state and block == compat.NULL_BLOCK_ID):
                    raise RuntimeError(f"kvoffload: vLLM allocated page {page} of chunk {index} of request "
                                       f"{state.request.request_id} in KV cache group {group.group}, which kvoffload "
                                       "did not store; please report this")
                block_ids.append(block)
                pages.append(group.slot_page(chunk_pages, page))
                if sources is not None:
                    source = held[group.group].get(page) if held is not None else None
                    sources = None if source is None else sources + [source]
        return block_ids, pages, sources

    def hit_sources(self, request: Any) -> dict[str, int]:
        """Tokens of the load just planned for ``request`` by where they came from: ``Entry.origin`` names."""
        state = self._requests.get(request.request_id)
        return dict(state.sources) if state is not None else {}

    def _release(self, state: _Request) -> None:
        for entry in state.pinned:
            self.index.unpin(entry)
        state.pinned = []

    # ---- per step plan ------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> StepPlan:
        plan = StepPlan(slot_bytes=self.slot_bytes, loads=self._loads, prefetches=self._prefetches)
        self._loads, self._prefetches = [], []
        self._running.update(scheduler_output.num_scheduled_tokens)
        plan.layer_hooks = max(scheduler_output.num_scheduled_tokens.values(), default=1) > self._full_graph_query_len
        for req_id in scheduler_output.preempted_req_ids or ():  # fields checked at start (kvoffload.vllm.compat)
            self._running.discard(req_id)
            state = self._requests.get(req_id)
            if state is not None:
                state.block_ids = []
                state.stored_blocks = {}
                plan.preempted.append(req_id)
        states = compat.boundary_states(scheduler_output) if self.layout.has_state else {}
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = [list(ids) for ids in new.block_ids]  # from 0.34 also a resumed request's (compat)
            state.stored_blocks = {}
            self._plan_stores(state, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id],
                              plan, states.get(new.req_id, {}))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = compat.resumed_req_ids(cached)
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                state.block_ids = [list(ids) for ids in new_ids] if new_ids is not None else []
                state.stored_blocks = {}
            elif new_ids is not None:
                if not state.block_ids:
                    state.block_ids = [[] for _ in new_ids]
                for group_ids, ids in zip(state.block_ids, new_ids):
                    group_ids.extend(ids)
            self._plan_stores(state, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id],
                              plan, states.get(req_id, {}))
        self.stats.set("pool_used_bytes", self.index.used_slots * self.slot_bytes)
        self.stats.set("pool_bytes", self.index.num_slots * self.slot_bytes)
        return plan

    def _plan_stores(self, state: _Request, computed: int, plan: StepPlan,
                     boundary_states: dict[int, dict[int, int]]) -> None:
        """Store the chunks ``computed`` completes; ``boundary_states``: this step's state blocks of the request
        (KV cache group -> boundary -> block), for a model with state groups."""
        request = state.request
        prompt = request.num_prompt_tokens
        # Only tokens vLLM has verified: with async scheduling or speculative decoding the scheduled tokens run
        # ahead of all_token_ids (placeholders, drafts that may be rejected); their KV is not a chunk's yet.
        limit = min(computed, len(request.all_token_ids)) if self.settings.save_decode_cache else min(computed, prompt)
        persist = self.persistent is not None
        copies: list[ChunkCopy] = []
        tokens = 0
        while True:
            chunk = state.next_chunk
            start = chunk * self.chunk_size
            if start + self.chunk_size <= limit:
                key, num_tokens = self._whole_key(state, chunk), self.chunk_size
                state.next_chunk += 1
            elif not state.tail_done and state.tail_key is not None and start < prompt <= limit \
                    and not self.layout.has_state:
                key, num_tokens = state.tail_key, prompt - start
                state.tail_done = True
            else:
                break
            known = self.index.get(key)
            if known is not None and not self._adds_state(known, start + num_tokens, boundary_states):
                self.index.touch(known)
                continue
            if known is not None:  # stored before without the state vLLM names now: store it again, with it
                self.index.drop(known)
            num_pages = math.ceil(num_tokens / self.block_size)
            stored = self._store_pages(state, start // self.block_size, num_pages, num_tokens,
                                       boundary_states)
            if stored is None:
                break
            block_ids, pages, by_group, has_state = stored
            entry = self.index.prepare(key, self.layout.payload_pages(num_pages), SlotState.STORING)
            if entry is None:  # every slot is busy being loaded, stored or written out
                self.stats.add("skipped_stores", 1)
                continue
            entry.has_state = has_state
            self.events.describe(key, request, start, num_tokens)
            copies.append(ChunkCopy(op=self._start(OpKind.STORE, entry), slot=entry.slot, block_ids=block_ids,
                                    first_page=0, num_pages=entry.num_pages, key=self._tier_key(entry),
                                    persist_op=self._start(OpKind.PERSIST, entry) if persist else None,
                                    pages=pages if self.layout.compact else None))
            state.stored_blocks[key] = by_group
            tokens += num_tokens
        if copies:
            state.stored_any = True
            plan.stores.append(RequestCopies(req_id=request.request_id, chunks=copies, num_tokens=tokens,
                                             total_tokens=request.num_tokens))

    def _store_pages(self, state: _Request, first_block: int, num_pages: int, num_tokens: int,
                     boundary_states: dict[int, dict[int, int]],
                     ) -> tuple[list[int], list[int], list[dict[int, int]], bool] | None:
        """The blocks of a chunk to store (every group's pages it keeps, ``GroupSlot.stored_pages``, one group after
        the other), their slot pages, per group {chunk page: block}, and whether every state group's state at the
        chunk's end is among them; None while vLLM has not given every attention block.

        A state group's page is the block vLLM named this step for the boundary at the chunk's end: an align-mode
        block list is not append-only, so ``state.block_ids`` cannot tell which block holds which state."""
        block_ids: list[int] = []
        pages: list[int] = []
        by_group: list[dict[int, int]] = []
        end = (first_block + num_pages) * self.block_size
        has_state = True
        for group in self.layout.groups:
            if group.state:
                block = boundary_states.get(group.group, {}).get(end)
                has_state = has_state and block is not None
                by_group.append({num_pages - 1: block} if block is not None else {})
                if block is not None:
                    block_ids.append(block)
                    pages.append(group.first_page)
                continue
            ids = state.block_ids[group.group] if group.group < len(state.block_ids) else []
            if len(ids) < first_block + num_pages:
                return None
            kept: dict[int, int] = {}
            for page in group.stored_pages(num_pages, num_tokens, self.block_size):
                kept[page] = ids[first_block + page]
                block_ids.append(kept[page])
                pages.append(group.slot_page(num_pages, page))
            by_group.append(kept)
        return block_ids, pages, by_group, has_state and self.layout.has_state

    def _adds_state(self, known: Entry, end: int, boundary_states: dict[int, dict[int, int]]) -> bool:
        """Whether this step names the state at token ``end`` for an idle chunk that was stored without it (vLLM
        kept no state there for an earlier request): without that state it could never end a hit."""
        return (self.layout.has_state and not known.has_state and known.state is SlotState.READY and known.pins == 0
                and all(end in boundary_states.get(g.group, {}) for g in self.layout.groups if g.state))

    @staticmethod
    def _tier_key(entry: Entry) -> bytes:
        """The key of ``entry`` on disk and in Redis: a chunk kept with its state has a key of its own."""
        return with_state_key(entry.key) if entry.has_state else entry.key

    def _whole_key(self, state: _Request, chunk: int) -> bytes:
        if chunk < len(state.prompt_keys):
            return state.prompt_keys[chunk]
        # a chunk made of generated tokens (save_decode_cache): extend the chain as tokens arrive
        base = len(state.prompt_keys)
        while len(state.decode_keys) <= chunk - base:
            index = base + len(state.decode_keys)
            parent = state.decode_keys[-1] if state.decode_keys else (
                state.prompt_keys[-1] if state.prompt_keys else state.namespace)
            tokens = state.request.all_token_ids[index * self.chunk_size:(index + 1) * self.chunk_size]
            if len(tokens) < self.chunk_size:  # _plan_stores never asks beyond the verified tokens
                raise RuntimeError(f"kvoffload: chunk {index} of request {state.request.request_id} is not whole yet")
            state.decode_keys.extend(chunk_keys(state.namespace, tokens, self.chunk_size, start_key=parent,
                                                include_partial=False))
        return state.decode_keys[chunk - base]

    # ---- completion ---------------------------------------------------------------------------------

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Keep the request's blocks until the workers finished copying out of them (``finished_sending``)."""
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: Any,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        """``request_finished`` with the blocks of every KV cache group (vLLM's hybrid manager, ``SupportsHMA``)."""
        self._running.discard(request.request_id)
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        self._release(state)
        if state.stored_any:
            # Only blocks vLLM keeps for us: never those of a preemption before, nor a sliding-window group's blocks
            # that left the window (vLLM freed them, they are its null block in block_ids now).
            # Nor a model's with state: the block of a boundary state is named in its own step only.
            kept = [set(ids) for ids in block_ids]
            keys = [key for key, blocks in state.stored_blocks.items() if not self.layout.has_state
                    and all(g < len(kept) and kept[g].issuperset(pages.values()) for g, pages in enumerate(blocks))]
            for key in keys:
                self._held[key] = (request.request_id, state.stored_blocks[key])
            self._held_keys[request.request_id] = keys
        return state.stored_any, None

    def update_connector_output(self, connector_output: Any) -> None:
        self._async_loads.difference_update(connector_output.finished_recving or ())
        for req_id in connector_output.finished_sending or ():  # vLLM frees their blocks now
            for key in self._held_keys.pop(req_id, ()):
                if self._held.get(key, (None,))[0] == req_id:
                    del self._held[key]
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, WorkerReport):
            return
        if report.layout is not None and self.persistent is None and self._wants_persistence():
            self.persistent = PersistentLookup(
                self.settings, storage_fingerprint(self.fingerprint, report.layout, self.share.rank,
                                                   self.share.world_size))
        for op_id in sorted(set(report.done) | set(report.failed)):  # in planning order: a store before its persist
            op = self._ops.get(op_id)
            if op is None:  # a bug, but not one that can load wrong bytes: keep serving
                logger.error("kvoffload: a worker reported operation %d, which is not in flight; please report "
                             "this", op_id)
                continue
            op.done += report.done.get(op_id, 0)
            op.failed += report.failed.get(op_id, 0)
            op.source = report.sources.get(op_id, op.source)
            if op.done + op.failed >= self.world_size:
                del self._ops[op_id]
                self._complete(op)
        if self.persistent is not None:
            for key in report.removed:
                self.persistent.discard(key)
                self.events.removed(key, events.STORAGE)

    def _wants_persistence(self) -> bool:
        """Whether to open the disk/remote index."""
        return self.fingerprint.identified and (
            self.settings.local_disk is not None or self.settings.remote_url is not None)

    def take_events(self) -> list[Any]:
        """KV cache events since the last call (``kvoffload.vllm.events``), for vLLM to publish."""
        return self.events.take()

    def has_pending_work(self) -> bool:
        """Stores, write-outs or prefetches not yet reported by every worker (loads belong to running requests)."""
        return len(self._ops) > self._in_flight[OpKind.LOAD] or bool(self._loads or self._prefetches)

    def reset_cache(self) -> bool:
        self.index.clear_idle()
        return True

    def take_stats(self) -> KVOffloadStats | None:
        evictions = self.index.evictions - self._evictions_seen
        if evictions:
            self.stats.add("evictions", evictions)
            self._evictions_seen = self.index.evictions
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, KVOffloadStats()
        stats.set("pool_used_bytes", self.index.used_slots * self.slot_bytes)
        stats.set("pool_bytes", self.index.num_slots * self.slot_bytes)
        return stats

    def shutdown(self) -> None:
        if self.persistent is not None:
            self.persistent.close()
