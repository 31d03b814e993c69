"""The one interface every persistent tier (disk, Redis/Valkey) implements.

Persistent tiers live on the worker side: they move the bytes of whole chunks between the host pool and
their medium. They never decide what to store or load (the scheduler side does) and never touch the GPU.

A payload is the bytes of one chunk as it sits in a host-pool slot. A tier stores it with a header that
names the full chunk key and the *storage fingerprint* (model, KV layout, TP rank and size, format
version) and carries a checksum of the payload. ``get_into`` returns True only after the header matched
and the checksum verified: a truncated, corrupted or foreign entry is removed and reported as a miss, so
the request recomputes. Nothing here raises for an expected condition (missing entry, server down, disk
full): failures are counted in :class:`TierStats` and reported as False.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Iterable


class PutResult(Enum):
    STORED = "stored"
    SKIPPED = "skipped"  # not written on purpose (limit smaller than the chunk, tier busy)
    FAILED = "failed"  # written but failed (disk full, read-only, server down): counted as an error


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0  # chunks stored
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    skipped_writes: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.__dict__)
        out["read_gbps"] = self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0
        out["write_gbps"] = self.bytes_written / self.write_seconds / 1e9 if self.write_seconds else 0.0
        return out


class ChunkTier(ABC):
    """A persistent store of chunk payloads keyed by ``bytes`` chunk keys. Thread-safe."""

    name: str
    stats: TierStats

    @abstractmethod
    def put(self, key: bytes, payload: memoryview) -> PutResult:
        """Store ``payload`` under ``key`` (blocking; called from a writer thread)."""

    @abstractmethod
    def get_into(self, key: bytes, out: memoryview) -> bool:
        """Fill ``out`` (exactly the payload's size) with the verified payload; False on miss or bad entry."""

    @abstractmethod
    def contains(self, keys: Iterable[bytes]) -> list[bool]:
        """Which of ``keys`` are present (cheap: no payload is read or verified)."""

    def put_many(self, items: list[tuple[bytes, memoryview]]) -> list[PutResult]:
        """Store several payloads; remote tiers override this with one pipelined round trip."""
        return [self.put(key, payload) for key, payload in items]

    def get_many_into(self, items: list[tuple[bytes, memoryview]]) -> list[bool]:
        """Fetch several payloads; remote tiers override this with one pipelined round trip."""
        return [self.get_into(key, out) for key, out in items]

    def drain_removed(self) -> list[bytes]:
        """Keys removed since the last call (eviction, corruption), so the scheduler's index can follow."""
        return []

    def close(self) -> None:
        """Release files, connections and threads."""
