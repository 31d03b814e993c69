"""Scheduler-side index of the host pool: which chunk lives in which slot, and what may be evicted.

The index decides; it never touches bytes. Every slot is in exactly one of these states:

* free,
* ``STORING``: a store was planned; the bytes are valid only once every worker reported it done,
* ``PREFETCHING``: a read from disk/remote into the slot was planned; valid once every worker succeeded,
* ``READY``: valid bytes.

An entry goes through *prepare* (a slot for a chunk whose bytes are on their way) and *complete* (the
operation that fills it succeeded: READY; or failed: the entry is dropped). Whoever reads or fills a slot
holds a pin on its :class:`Entry` object, not on its key, for as long as it does: an operation, or a request
between its lookup and its load. No path frees a pinned slot. A READY entry is evictable (least recently
used first) only while nothing pins it; ``drop`` of a pinned entry takes it out of the index at once (a
lookup no longer finds it, and the key may get a new entry) and frees its slot at the last unpin, so a pin
can never release or protect another entry of the same key. Slots are fixed-size (one chunk), so "LRU by
bytes" and "LRU by slots" are the same thing, and the pool can never exceed its configured size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class SlotState(Enum):
    STORING = "storing"
    PREFETCHING = "prefetching"
    READY = "ready"


#: ``Entry.origin`` of bytes copied from vLLM's own blocks.
HOST = "host"


@dataclass(eq=False)  # compared and hashed by identity: two entries of one key are two different slots
class Entry:
    key: bytes
    slot: int
    num_pages: int
    state: SlotState
    pins: int = 0
    indexed: bool = True  # False once dropped: no lookup finds it; its slot is freed at the last unpin
    #: Where the bytes came from, for vLLM's per-source hit metric: HOST, or the persistent tier ("disk",
    #: "redis") a prefetch read them from, until the first load planned from the entry (then the host pool).
    origin: str = HOST
    #: The slot also holds the Mamba/linear-attention state after the chunk's last token (a model with state
    #: groups, ``SlotLayout.has_state``): only such a chunk may end a hit.
    has_state: bool = False


class HostIndex:
    def __init__(self, num_slots: int, on_remove: Callable[[Entry], None] | None = None) -> None:
        """``on_remove``: called for every READY chunk that leaves the index (evicted, dropped, cleared)."""
        self.num_slots = num_slots
        self._on_remove = on_remove
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

    def touch(self, entry: Entry) -> None:
        if entry.indexed:
            self._entries.move_to_end(entry.key)

    def prepare(self, key: bytes, num_pages: int, state: SlotState) -> Entry | None:
        """A slot for a chunk whose bytes an operation is about to bring (``STORING`` or ``PREFETCHING``),
        evicting the least recently used idle chunk if needed; None if every slot is busy."""
        if key in self._entries:
            raise KeyError("chunk already indexed")
        if not self._free and not self._evict_one():
            return None
        entry = Entry(key=key, slot=self._free.pop(), num_pages=num_pages, state=state)
        self._entries[key] = entry
        return entry

    def complete(self, entry: Entry, ok: bool) -> None:
        """The operation that fills ``entry`` finished: its bytes are valid (READY) or must never be read."""
        if ok:
            entry.state = SlotState.READY
        else:
            self.drop(entry)

    def _evict_one(self) -> bool:
        for entry in self._entries.values():
            if entry.state is SlotState.READY and entry.pins == 0:
                self.drop(entry)
                self.evictions += 1
                return True
        return False

    def drop(self, entry: Entry) -> None:
        """Take the chunk out of the index now; free its slot now, or at the last unpin while something reads
        or fills it."""
        if entry.indexed:
            entry.indexed = False
            del self._entries[entry.key]
            if entry.pins == 0:
                self._free.append(entry.slot)
            if entry.state is SlotState.READY and self._on_remove is not None:
                self._on_remove(entry)

    def pin(self, entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        if entry.pins <= 0:
            raise RuntimeError("kvoffload: a host-pool slot was unpinned more often than pinned; please report this")
        entry.pins -= 1
        if entry.pins == 0 and not entry.indexed:
            self._free.append(entry.slot)

    def clear_idle(self) -> None:
        """Drop every READY, unpinned chunk (``reset_prefix_cache``)."""
        for entry in [e for e in self._entries.values() if e.state is SlotState.READY and e.pins == 0]:
            self.drop(entry)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)
