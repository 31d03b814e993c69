"""Background stores to a persistent tier, without ever making the inference loop wait.

A store to disk or Redis takes milliseconds to seconds; the step that produced the KV must not. So
``submit`` only enqueues, and when the bounded queue is full the chunk is not stored at all: it is
answered ``SKIPPED`` at once (counted in the tier's ``stats.skipped_writes``). A cache that drops writes
under load costs a later recompute; one that blocks the engine costs every request's latency now.

Worker threads take what is queued, up to :data:`MAX_BATCH` items at a time, and hand it to
``tier.put_many``, so the Redis tier sends a whole batch in one round trip.

Contract with the caller: the payload is a view of a host-pool slot and is read until its ``done``
callback runs, so the slot must stay reserved until then. ``done`` runs on a writer thread, or on the
caller's thread when the write is skipped; it must be quick and must not call back into the writer.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from kvoffload.tiers.base import ChunkTier, PutResult

logger = logging.getLogger(__name__)

Done = Callable[[PutResult], None]
#: Items per ``put_many`` call: enough to amortise a Redis round trip, small enough to keep latency low.
MAX_BATCH = 16
#: Default queue bound. Each queued item holds a host-pool slot (32 MiB for a 256-token chunk of
#: Llama-8B), so the bound caps the pool taken by a slow tier: 32 items is ~1 GiB, about half a second
#: of a fast NVMe drive's write rate; beyond that, skipping is cheaper than starving the pool.
DEFAULT_MAX_PENDING = 32
_STOP = None


class AsyncWriter:
    """A bounded queue of ``(key, payload, done)`` and ``threads`` threads that store them on ``tier``."""

    def __init__(self, tier: ChunkTier, max_pending: int = DEFAULT_MAX_PENDING, threads: int = 1) -> None:
        if max_pending <= 0 or threads <= 0:
            raise ValueError(f"max_pending and threads must be > 0, got {max_pending} and {threads}")
        self.tier = tier
        self._queue: queue.Queue[tuple[bytes, memoryview, Done] | None] = queue.Queue(max_pending)
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"kvoffload-{tier.name}-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: bytes, payload: memoryview, done: Done) -> None:
        """Queue a store; if the queue is full (or the writer closed), call ``done(SKIPPED)`` right away."""
        with self._lock:  # so that nothing lands in the queue behind close()'s stop markers
            if not self._closed:
                try:
                    self._queue.put_nowait((key, payload, done))
                    return
                except queue.Full:
                    pass
        self._skip(done)

    def pending(self) -> int:
        """Stores queued and not yet taken by a writer thread (approximate, for logs)."""
        return self._queue.qsize()

    def close(self, drain: bool = True) -> None:
        """Stop the threads: after storing what is queued (``drain``), or answering it ``SKIPPED``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not drain:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    self._skip(item[2])
        for _ in self._threads:
            self._queue.put(_STOP)  # blocks while a full queue drains: only at shutdown
        for thread in self._threads:
            thread.join()

    def _skip(self, done: Done) -> None:
        self.tier.stats.skipped_writes += 1
        _call(done, PutResult.SKIPPED)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:  # one marker per thread: this one is ours
                    stop = True
                    break
                batch.append(item)
            try:
                results = self.tier.put_many([(key, payload) for key, payload, _ in batch])
            except Exception:  # tiers never raise for expected failures: this is a bug, keep the thread alive
                logger.exception("kvoffload %s tier raised while storing %d chunks; they are not stored",
                                 self.tier.name, len(batch))
                results = [PutResult.FAILED] * len(batch)
            for (_, _, done), result in zip(batch, results):
                _call(done, result)
            if stop:
                return


def _call(done: Done, result: PutResult) -> None:
    try:
        done(result)
    except Exception:
        logger.exception("kvoffload: a store completion callback raised")
