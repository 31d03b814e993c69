"""KV cache events for cache-aware routers: which prefixes this instance holds outside the GPU, and where.

vLLM publishes KV cache events (``--kv-events-config``, ZMQ) that routers read to send a request to the
instance that holds its prefix (llm-d's precise prefix-cache scorer, Dynamo's KV router, the vLLM router).
The GPU prefix cache reports its own blocks; the connector's events come through ``take_events``. kvoffload
reports each chunk as the ``BlockStored``/``BlockRemoved`` of its vLLM blocks, with vLLM's own block hashes
(a router matches those, not kvoffload's chunk keys), and the medium that holds it: ``CPU`` for the host
pool, ``STORAGE`` for the disk and remote tiers.

What a chunk's event says is taken from the request that stored or prefetched it (its block hashes and
tokens), and kept until the chunk has left every medium, so that the removal names the same hashes. A chunk
found on disk after a restart and not looked up since is not announced: its hashes are known only once a
request asks for it. A chunk kept with its Mamba/GDN state is written to disk and Redis under a key of its own
(``keys.with_state_key``), which is what the disk tier's removal report names: it is mapped back to the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvoffload.vllm import compat

CPU = "CPU"
STORAGE = "STORAGE"


@dataclass
class _Described:
    """What the events of one chunk say, and the media it is in now."""

    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    lora_id: int | None
    lora_name: str | None
    media: set[str] = field(default_factory=set)
    stored_as: bytes | None = None  # the persistent tiers' key when it is not the chunk's


class ChunkEvents:
    def __init__(self, vllm_config: Any, block_size: int) -> None:
        config = getattr(vllm_config, "kv_events_config", None)
        self.enabled = bool(config is not None and getattr(config, "enable_kv_cache_events", False))
        self.block_size = block_size
        self._chunks: dict[bytes, _Described] = {}
        self._stored_as: dict[bytes, bytes] = {}  # persistent tiers' key -> chunk key, where they differ
        self._events: list[Any] = []

    def describe(self, key: bytes, request: Any, first_token: int, num_tokens: int) -> None:
        """Remember the vLLM blocks of a chunk about to be stored or prefetched (only whole, hashed blocks: a
        partial last block has no hash, and no router can match it)."""
        if not self.enabled or key in self._chunks:
            return
        hashes = getattr(request, "block_hashes", None) or []
        first, end = first_token // self.block_size, (first_token + num_tokens) // self.block_size
        if end <= first or len(hashes) < end:
            return
        lora = getattr(request, "lora_request", None)
        self._chunks[key] = _Described(
            block_hashes=[compat.external_block_hash(h) for h in hashes[first:end]],
            parent_block_hash=compat.external_block_hash(hashes[first - 1]) if first else None,
            token_ids=list(request.all_token_ids[first * self.block_size:end * self.block_size]),
            lora_id=lora.adapter_id if lora is not None else None,
            lora_name=lora.name if lora is not None else None)

    def stored(self, key: bytes, medium: str, stored_as: bytes | None = None) -> None:
        """``stored_as``: the key the chunk was written under on disk or Redis, when it is not ``key``."""
        described = self._chunks.get(key)
        if described is None:
            return
        if stored_as is not None and stored_as != key:
            described.stored_as = stored_as
            self._stored_as[stored_as] = key
        if medium in described.media:
            return
        described.media.add(medium)
        self._events.append(compat.block_stored(
            block_hashes=described.block_hashes, parent_block_hash=described.parent_block_hash,
            token_ids=described.token_ids, block_size=self.block_size, lora_id=described.lora_id,
            lora_name=described.lora_name, medium=medium, group_idx=0))

    def removed(self, key: bytes, medium: str) -> None:
        """``key``: the chunk's, or for STORAGE the key a tier names in its report (``stored_as``)."""
        if medium == STORAGE:
            key = self._stored_as.get(key, key)
        described = self._chunks.get(key)
        if described is None or medium not in described.media:
            return
        described.media.discard(medium)
        self._events.append(compat.block_removed(block_hashes=described.block_hashes, medium=medium, group_idx=0))
        if medium == STORAGE and described.stored_as is not None:
            self._stored_as.pop(described.stored_as, None)
            described.stored_as = None
        if not described.media:
            del self._chunks[key]

    def forget(self, key: bytes) -> None:
        """A chunk described for a prefetch that failed: it is in no medium, and nothing announces it."""
        described = self._chunks.get(key)
        if described is not None and not described.media:
            del self._chunks[key]

    def take(self) -> list[Any]:
        events, self._events = self._events, []
        return events
