"""What the scheduler side tells the workers each step, and what the workers report back.

Both travel between processes (pickled by vLLM), so they are plain dataclasses of ints, bytes and lists.
Reports count per key because with tensor parallelism every rank reports the same key once; the
scheduler acts when the count reaches the world size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class ChunkCopy:
    """Pages of one chunk to move between vLLM blocks and a host slot."""

    key: bytes
    slot: int
    block_ids: list[int]
    first_page: int  # page of the slot that block_ids[0] maps to
    persist: bool = False  # after a store: write the chunk to the persistent tiers too
    num_pages: int = 0  # pages of the chunk's payload (whole chunk or partial tail)
    # A load whose chunk is still in vLLM blocks that a finished request holds for its stores: copy
    # source_block_ids[i] -> block_ids[i] on the device instead of from the slot (see the scheduler).
    source_block_ids: list[int] | None = None


@dataclass
class RequestCopies:
    req_id: str
    chunks: list[ChunkCopy]
    num_tokens: int  # tokens these copies cover
    total_tokens: int  # tokens of the request, for the log line
    sync: bool = False  # a load this step's forward reads (else vLLM waits for finished_recving)


@dataclass
class Prefetch:
    """Read a chunk from a persistent tier into a host slot."""

    key: bytes
    slot: int
    num_pages: int


@dataclass
class StepPlan(KVConnectorMetadata):
    slot_bytes: int = 0
    loads: list[RequestCopies] = field(default_factory=list)
    stores: list[RequestCopies] = field(default_factory=list)
    prefetches: list[Prefetch] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.prefetches or self.preempted)


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    stored: Counter = field(default_factory=Counter)  # key -> ranks whose store finished
    loaded: Counter = field(default_factory=Counter)  # key -> ranks whose load from the slot finished
    persisted: Counter = field(default_factory=Counter)  # key -> ranks done writing it out (ok or not)
    persisted_ok: Counter = field(default_factory=Counter)
    prefetched: Counter = field(default_factory=Counter)  # key -> ranks whose prefetch succeeded
    prefetch_failed: Counter = field(default_factory=Counter)
    removed: set = field(default_factory=set)  # keys a persistent tier dropped (eviction, corruption)
    layout: str | None = None  # the worker's KV layout signature, sent once: names its persistent storage

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        return WorkerReport(
            stored=self.stored + other.stored,
            loaded=self.loaded + other.loaded,
            persisted=self.persisted + other.persisted,
            persisted_ok=self.persisted_ok + other.persisted_ok,
            prefetched=self.prefetched + other.prefetched,
            prefetch_failed=self.prefetch_failed + other.prefetch_failed,
            removed=self.removed | other.removed,
            layout=self.layout or other.layout,
        )

    def is_empty(self) -> bool:
        return not (self.stored or self.loaded or self.persisted or self.prefetched or self.prefetch_failed
                    or self.removed or self.layout)
