"""The remote tier: chunks as Redis/Valkey string values, shared by every engine that uses the server.

Key ``kvoffload:<fingerprint.hex()[:16]>:<key.hex()>``; value = the header of :mod:`kvoffload.tiers.disk`
followed by the payload, so a value written by another model, a truncated value or a flipped byte is
detected at read time and deleted instead of being served (LMCache's remote header has no checksum).

A remote server may vanish, stall or come back different at any moment; how each call is bounded by
``timeout`` and how a server that fails is skipped, probed and used again is in
:mod:`kvoffload.tiers.redis_node`. ``remote_url`` names one server (:class:`~kvoffload.tiers.redis_node.Single`)
or, as ``redis+cluster://``, the masters of a cluster (:class:`~kvoffload.tiers.redis_cluster.Cluster`), each
of which is skipped alone while it is down. Each batch (``SET``/``GET``/``EXISTS``) is one pipelined round
trip to each server it touches, so a batch costs one timeout at most, not one per chunk. A command the
server refuses inside a batch (out of memory, wrong type) fails that chunk only and is logged once per kind.

With a shared secret (``remote_auth_key_file``) each value also ends with an HMAC-SHA256 of the header
and the payload, so only an engine holding the secret can write an entry that is served: the xxh3
checksum catches accidents, not a writer who computes it too. A tier with a secret treats an unsigned
or wrongly signed entry as corrupt (miss, counted, deleted); a tier without one treats a signed entry
the same way, so engines sharing a server must all use the same secret or none. Nothing derived from
the secret is stored on the server but the signatures.

``stats.errors`` counts the chunks a put or get could not serve because of the server (a failed call, a
refused command, an unexpected reply, or the tier being down); ``contains`` answers False while down and
is not counted. The password is never logged: URLs are redacted and any message from the client has it
masked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import unquote, urlparse

import redis
import xxhash

from kvoffload.config import is_cluster_url, redact_url
from kvoffload.tiers.base import ChunkTier, PutResult, TierStats
from kvoffload.tiers.disk import (HEADER_SIZE, BadEntry, OnceLog, byte_view, check_header, pack_header,
                                  unpack_header)
from kvoffload.tiers.redis_cluster import Cluster
from kvoffload.tiers.redis_node import UNAVAILABLE, Single

if TYPE_CHECKING:
    from kvoffload.config import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = b"kvoffload:"
MAC_SIZE = hashlib.sha256().digest_size
#: Signed first, so a signature made with the same secret for another purpose never verifies here.
_MAC_CONTEXT = b"kvoffload remote entry v1\0"


def secret_of(url: str, password: str | None) -> str | None:
    """The password in use (``password`` wins over the URL's), to mask in every message."""
    return password or (unquote(urlparse(url).password or "") or None)


def backend(url: str, password: str | None, timeout: float) -> Single | Cluster:
    """The server, or the cluster's masters, that ``url`` names."""
    return (Cluster if is_cluster_url(url) else Single)(url, password, timeout, secret_of(url, password))


class RedisTier(ChunkTier):
    """Chunk payloads in a Redis or Valkey server or cluster, with optional expiry (``ttl`` seconds)."""

    name = "redis"

    def __init__(self, url: str, fingerprint: bytes, password: str | None, timeout: float,
                 ttl: float | None, auth_key: bytes | None = None) -> None:
        if len(fingerprint) != 32:
            raise ValueError(f"fingerprint must be 32 bytes, got {len(fingerprint)}")
        self.fingerprint = fingerprint
        self._auth_key = auth_key
        self.stats = TierStats()
        self._servers = backend(url, password, timeout)
        self._secret = secret_of(url, password)
        self._where = redact_url(url)
        self._prefix = KEY_PREFIX + fingerprint.hex()[:16].encode() + b":"
        self._px = max(1, round(ttl * 1000)) if ttl else None
        self._lock = threading.Lock()
        self._removed: list[bytes] = []
        self._log = OnceLog(logger)
        if self._servers.start():
            logger.info("kvoffload remote tier %s: connected%s", self._where,
                        ", entries signed" if auth_key is not None else "")

    @classmethod
    def from_settings(cls, settings: Settings, fingerprint: bytes) -> RedisTier:
        """The tier ``settings`` describe; raises ConfigError if ``remote_auth_key_file`` cannot be used."""
        assert settings.remote_url is not None
        return cls(settings.remote_url, fingerprint, settings.remote_password, settings.remote_timeout,
                   settings.remote_ttl, settings.remote_auth_key())

    # ---------------------------------------------------------------- ChunkTier

    def put(self, key: bytes, payload: memoryview) -> PutResult:
        return self.put_many([(key, payload)])[0]

    def put_many(self, items: list[tuple[bytes, memoryview]]) -> list[PutResult]:
        if not items:
            return []
        start = time.perf_counter()
        views = [(key, byte_view(payload)) for key, payload in items]
        names = [self._name(key) for key, _ in items]

        def queue(pipe: redis.client.Pipeline, i: int) -> None:  # values are built only for a server asked
            pipe.set(names[i], self._value(*views[i]), px=self._px)

        replies = _expect(self._servers.batch(names, queue), lambda reply: reply is True)
        elapsed = time.perf_counter() - start
        results = [PutResult.STORED if reply is True else PutResult.FAILED for reply in replies]
        with self._lock:
            self.stats.errors += results.count(PutResult.FAILED)
            self.stats.writes += results.count(PutResult.STORED)
            self.stats.bytes_written += sum(view.nbytes for (_, view), result in zip(views, results)
                                            if result is PutResult.STORED)
            if any(reply is not UNAVAILABLE for reply in replies):  # time spent talking to a server
                self.stats.write_seconds += elapsed
        for reply in replies:
            if isinstance(reply, Exception):
                self._log_refusal("SET", reply)
        return results

    def get_into(self, key: bytes, out: memoryview) -> bool:
        return self.get_many_into([(key, out)])[0]

    def get_many_into(self, items: list[tuple[bytes, memoryview]]) -> list[bool]:
        if not items:
            return []
        start = time.perf_counter()
        names = [self._name(key) for key, _ in items]
        replies = _expect(self._servers.batch(names, lambda pipe, i: pipe.get(names[i])),
                          lambda reply: reply is None or isinstance(reply, bytes))
        results: list[bool] = []
        corrupt: list[bytes] = []
        nbytes = 0
        for (key, out), reply in zip(items, replies):
            out = byte_view(out)
            if not isinstance(reply, bytes):  # a miss, a refusal or a server that is down
                if isinstance(reply, Exception):
                    self._log_refusal("GET", reply)
                results.append(False)
                continue
            try:
                self._verify(key, reply, out.nbytes)
            except BadEntry as exc:
                corrupt.append(key)
                self._log.warning(f"corrupt:{exc}", "kvoffload remote tier %s: deleted %s: %s; the request "
                                  "recomputes this chunk", self._where, self._name(key).decode(), exc)
                results.append(False)
                continue
            out[:] = memoryview(reply)[HEADER_SIZE:HEADER_SIZE + out.nbytes]
            nbytes += out.nbytes
            results.append(True)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.hits += sum(results)
            self.stats.misses += len(results) - sum(results)
            self.stats.errors += sum(reply is UNAVAILABLE or isinstance(reply, Exception) for reply in replies)
            self.stats.corrupt += len(corrupt)
            self.stats.bytes_read += nbytes
            if any(reply is not UNAVAILABLE for reply in replies):
                self.stats.read_seconds += elapsed
            self._removed.extend(corrupt)
        if corrupt:
            gone = [self._name(key) for key in corrupt]
            self._servers.batch(gone, lambda pipe, i: pipe.delete(gone[i]))  # one key each: a cluster routes it
        return results

    def contains(self, keys: Iterable[bytes]) -> list[bool]:
        names = [self._name(key) for key in keys]
        if not names:
            return []
        return [reply == 1 for reply in self._servers.batch(names, lambda pipe, i: pipe.exists(names[i]))]

    def drain_removed(self) -> list[bytes]:
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    def close(self) -> None:
        self._servers.close()

    # ---------------------------------------------------------------- internals

    def _name(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    def _value(self, key: bytes, view: memoryview) -> bytes:
        header = pack_header(key, self.fingerprint, view)
        parts = (header, view) if self._auth_key is None else (header, view, self._mac(header, view))
        return b"".join(parts)

    def _mac(self, header: bytes | memoryview, payload: memoryview) -> bytes:
        mac = hmac.new(self._auth_key, _MAC_CONTEXT, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def _verify(self, key: bytes, value: bytes, length: int) -> None:
        header = unpack_header(value)
        check_header(header, key, self.fingerprint, length)
        size = HEADER_SIZE + length
        if self._auth_key is None and len(value) == size + MAC_SIZE:
            raise BadEntry("entry is signed (written by an engine with remote_auth_key_file set); set the same "
                           "remote_auth_key_file here, or none on every engine")
        if self._auth_key is not None:
            if len(value) == size:
                raise BadEntry("entry is not signed (written without remote_auth_key_file, or forged)")
            size += MAC_SIZE
        if len(value) != size:
            raise BadEntry("value size does not match the header (truncated or extended)")
        view = memoryview(value)
        payload = view[HEADER_SIZE:HEADER_SIZE + length]
        if self._auth_key is not None and not hmac.compare_digest(self._mac(view[:HEADER_SIZE], payload),
                                                                   view[HEADER_SIZE + length:]):
            raise BadEntry("signature mismatch (written with another remote_auth_key_file, or forged)")
        if xxhash.xxh3_128_digest(payload) != header.checksum:
            raise BadEntry("payload checksum mismatch")

    def _log_refusal(self, command: str, exc: Exception) -> None:
        kind = type(exc).__name__
        self._log.warning(f"{command}:{kind}", "kvoffload remote tier %s refused %s: %s: %s", self._where, command,
                          kind, self._servers.nodes[0].mask(str(exc)) if self._servers.nodes else str(exc))


def _expect(replies: list, valid: Callable[[object], bool]) -> list:
    """``replies`` with each one that is neither an error nor ``valid`` turned into an error: a server that
    is not quite Redis must not hand an integer to the checksum code."""
    return [reply if reply is UNAVAILABLE or isinstance(reply, Exception) or valid(reply)
            else redis.exceptions.InvalidResponse(f"unexpected reply of type {type(reply).__name__}")
            for reply in replies]


# -------------------------------------------------------------------- CLI helpers


@dataclass(frozen=True)
class RemoteEntry:
    namespace: str  # the 16-hex-digit fingerprint prefix
    key: bytes
    bytes: int


def _names(client: redis.Redis) -> Iterable[bytes]:
    return client.scan_iter(match=KEY_PREFIX + b"*", count=1000)


def _batches(names: Iterable[bytes], size: int = 1000) -> Iterable[list[bytes]]:
    batch: list[bytes] = []
    for name in names:
        batch.append(name)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def list_keys(client: redis.Redis) -> list[RemoteEntry]:
    """Every kvoffload chunk on the server, of every namespace (SCAN, then STRLEN per batch)."""
    entries: list[RemoteEntry] = []
    for batch in _batches(_names(client)):
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.strlen(name)
        for name, size in zip(batch, pipe.execute()):
            parts = name.split(b":")
            if len(parts) != 3 or not size:  # not ours, or expired between SCAN and STRLEN
                continue
            try:
                key = bytes.fromhex(parts[2].decode())
            except ValueError:
                continue
            entries.append(RemoteEntry(parts[1].decode(errors="replace"), key, size))
    return entries


def clear(client: redis.Redis) -> int:
    """Delete every kvoffload chunk on the server, or on one master of a cluster (other keys are left
    alone); returns how many."""
    removed = 0
    for batch in _batches(_names(client)):
        pipe = client.pipeline(transaction=False)
        for name in batch:  # one key per command: a cluster master refuses keys of several slots in one
            pipe.unlink(name)
        removed += sum(pipe.execute())
    return removed
