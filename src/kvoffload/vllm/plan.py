"""What the scheduler side tells the workers each step, and what the workers report back.

Both travel between processes (pickled by vLLM), so they are plain dataclasses of ints, bytes and lists.

Every copy the scheduler plans is an *operation* with an id of its own: the store of a chunk, its write-out
to the persistent tiers, a load of it into a request's blocks, a prefetch of it from disk/Redis. A worker
reports each operation it finished, by id, as done or failed; with tensor parallelism every rank reports
each operation once, and the scheduler completes it when all ranks have (failed if any rank failed). Ids,
not chunk keys: the same chunk loaded for two requests in one step, or stored again after its first entry
was dropped, is two operations that complete on their own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class ChunkCopy:
    """Pages of one chunk to move between vLLM blocks and a host slot."""

    op: int  # the id of this copy (a store or a load of the chunk)
    slot: int
    block_ids: list[int]
    first_page: int  # page of the slot that block_ids[0] maps to
    num_pages: int = 0  # pages of the chunk's payload (whole chunk or partial tail)
    key: bytes = b""  # of a store: the chunk's key, under which it is written out
    persist_op: int | None = None  # of a store: the id of its write-out to the persistent tiers, if any
    # A load whose chunk is still in vLLM blocks that a finished request holds for its stores: copy
    # source_block_ids[i] -> block_ids[i] on the device instead of from the slot (see the scheduler).
    source_block_ids: list[int] | None = None
    # The slot page of each of block_ids when they are not first_page, first_page + 1, ...: a model of several
    # KV cache groups (the hybrid manager) lists every group's blocks of the chunk one after the other, each group
    # at its own pages of the slot (kvoffload.vllm.identity.SlotLayout). None for one group: the plan is as before.
    pages: list[int] | None = None

    def page_list(self) -> list[int]:
        """The slot page of each of ``block_ids``."""
        if self.pages is not None:
            return self.pages
        return list(range(self.first_page, self.first_page + len(self.block_ids)))


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

    op: int
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
    # Whether the step's forward calls the per-layer hooks; False where vLLM may replay a full CUDA graph
    # (kvoffload.vllm.identity.full_graph_query_len): the step's loads are then in before its forward starts.
    layer_hooks: bool = True

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.prefetches or self.preempted)


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    done: Counter = field(default_factory=Counter)  # operation id -> ranks that finished it
    failed: Counter = field(default_factory=Counter)  # operation id -> ranks for which it failed
    sources: dict = field(default_factory=dict)  # prefetch id -> the tier that served it ("disk", "redis")
    removed: set = field(default_factory=set)  # keys a persistent tier dropped (eviction, corruption)
    layout: str | None = None  # the worker's KV layout signature, sent once: names its persistent storage

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        return WorkerReport(done=self.done + other.done, failed=self.failed + other.failed,
                            sources={**self.sources, **other.sources}, removed=self.removed | other.removed,
                            layout=self.layout or other.layout)

    def is_empty(self) -> bool:
        return not (self.done or self.failed or self.removed or self.layout)
