"""Scheduler-side view of the persistent tiers: which chunks exist on disk or in Redis/Valkey.

The workers own the files and connections that move bytes; the scheduler only needs to know whether a
chunk exists, to decide whether a prefetch is worth starting. For the disk tier that is a set of keys
built by listing the directory once, on a thread of its own (a large directory takes seconds, which
EngineCore's step loop must not wait; lookups ask vLLM to come back until it is done, see ``ready``),
and kept current from the workers' reports; for the remote tier it
is one pipelined ``EXISTS`` per lookup, on the scheduler's thread: it waits at most ``remote_timeout``,
and while the server is down it answers "absent" at once, the tier probing it on a thread of its own.
Existence is only a hint: the worker verifies every byte it reads (and its signature, with
``remote_auth_key_file``) and reports failures, and the request then recomputes.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from kvoffload.config import Settings
from kvoffload.keys import ModelFingerprint, with_state_key

logger = logging.getLogger("kvoffload")


def storage_fingerprint(model: ModelFingerprint, layout: str, rank: int, world_size: int) -> bytes:
    """Names one worker's persistent data: the model, the physical KV layout and the worker's rank."""
    text = f"{model.digest().hex()};layout={layout};rank={rank};world={world_size}"
    return hashlib.sha256(b"kvoffload-storage\0" + text.encode()).digest()


class PersistentLookup:
    def __init__(self, settings: Settings, fingerprint: bytes) -> None:
        # chunks known to be persisted: the disk listing at start, then every chunk a worker wrote out
        self._known: set[bytes] = set()
        self._lock = threading.Lock()  # the listing thread merges into _known while the scheduler updates it
        self._removed_while_listing: set[bytes] = set()
        self._listed = threading.Event()
        self._remote = None
        if settings.local_disk is not None:
            threading.Thread(target=self._list_disk, args=(settings.local_disk, fingerprint), daemon=True,
                             name="kvoffload-disk-listing").start()
        else:
            self._listed.set()
        if settings.remote_url is not None:
            from kvoffload.tiers.redis_tier import RedisTier
            self._remote = RedisTier.from_settings(settings, fingerprint)

    def _list_disk(self, root: str, fingerprint: bytes) -> None:
        from kvoffload.tiers.disk import list_disk_keys

        try:
            listed = list_disk_keys(root, fingerprint)
        except OSError as exc:  # unreadable directory: the workers' tier reports its own errors
            logger.warning("kvoffload: cannot list the disk tier %s (%s): its chunks are found again as they are "
                           "written", root, exc)
            listed = set()
        with self._lock:
            self._known |= listed - self._removed_while_listing
            self._removed_while_listing.clear()
            self._listed.set()
        logger.info("kvoffload: disk tier %s holds %d chunks for this model", root, len(listed))

    @property
    def ready(self) -> bool:
        """Whether the disk listing is done (lookups before it would miss what is on disk)."""
        return self._listed.is_set()

    def leading(self, keys: list[bytes], with_state: bool = False) -> list[bool]:
        """The run of ``keys``, from the first, that exists in some persistent tier: for each, whether it is kept
        with its state (``with_state_key``; asked only with ``with_state``, for a model with state groups)."""
        variants = [with_state_key(key) for key in keys] if with_state else []
        found: list[bool] = []
        with self._lock:
            for key, variant in zip(keys, variants or keys):
                stated = with_state and variant in self._known
                if not (stated or key in self._known):
                    break
                found.append(stated)
        rest = len(keys) - len(found)
        if self._remote is not None and rest:
            present = self._remote.contains(keys[len(found):] + variants[len(found):])  # one round trip
            for plain, stated in zip(present[:rest], present[rest:] if with_state else [False] * rest):
                if not (plain or stated):
                    break
                found.append(stated)
        return found

    def add(self, key: bytes) -> None:
        with self._lock:
            self._known.add(key)
            self._removed_while_listing.discard(key)

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._known.discard(key)
            if not self._listed.is_set():
                self._removed_while_listing.add(key)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
