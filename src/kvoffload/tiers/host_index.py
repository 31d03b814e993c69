"""Scheduler-side index of the host pool: which chunk lives in which slot, and what may be evicted.

The index decides; it never touches bytes. Every slot is in exactly one of these states:

* free,
* ``STORING``: a store was planned; the bytes are valid only once every worker reported it done,
* ``PREFETCHING``: a read from disk/remote into the slot was planned; valid once every worker succeeded,
* ``READY``: valid bytes.

A READY entry is evictable (least recently used first) unless a load reads from it or a persistent tier
still writes it out (``pins``). No path frees a pinned slot: ``drop`` of a pinned entry (a chunk written
out with ``local_cpu`` off while a planned load still reads it) takes effect at its last ``unpin``. Slots are fixed-size (one chunk), so "LRU by bytes" and "LRU by slots"
are the same thing, and the pool can never exceed its configured size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum


class SlotState(Enum):
    STORING = "storing"
    PREFETCHING = "prefetching"
    READY = "ready"


@dataclass
class Entry:
    slot: int
    num_pages: int
    state: SlotState
    pins: int = 0
    dropped: bool = False  # drop() was asked while pinned: freed at the last unpin


class HostIndex:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # least recently used first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Entry | None:
        return self._entries.get(key)

    def ready(self, key: bytes) -> Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.state is SlotState.READY else None

    def touch(self, key: bytes) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def allocate(self, key: bytes, num_pages: int, state: SlotState) -> Entry | None:
        """A slot for a new chunk, evicting the least recently used idle chunk if needed; None if all busy."""
        if key in self._entries:
            raise KeyError("chunk already indexed")
        if not self._free and not self._evict_one():
            return None
        entry = Entry(slot=self._free.pop(), num_pages=num_pages, state=state)
        self._entries[key] = entry
        return entry

    def _evict_one(self) -> bool:
        for key, entry in self._entries.items():
            if entry.state is SlotState.READY and entry.pins == 0:
                self.drop(key)
                self.evictions += 1
                return True
        return False

    def mark_ready(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.state = SlotState.READY

    def drop(self, key: bytes) -> None:
        """Remove the chunk and free its slot, or, while something still reads it, as soon as nothing does."""
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.pins > 0:
            entry.dropped = True
            return
        del self._entries[key]
        self._free.append(entry.slot)

    def pin(self, key: bytes) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1
            if entry.pins == 0 and entry.dropped:
                self.drop(key)

    def clear_idle(self) -> None:
        """Drop every READY, unpinned chunk (``reset_prefix_cache``)."""
        for key in [k for k, e in self._entries.items() if e.state is SlotState.READY and e.pins == 0]:
            self.drop(key)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)
