"""The remote tier: chunks as Redis/Valkey string values, shared by every engine that uses the server.

Key ``kvoffload:<fingerprint.hex()[:16]>:<key.hex()>``; value = the header of :mod:`kvoffload.tiers.disk`
followed by the payload, so a value written by another model, a truncated value or a flipped byte is
detected at read time and deleted instead of being served (LMCache's remote header has no checksum).

A remote server may vanish, stall or come back different (fewer databases, a password, not Redis at
all) at any moment, and the inference loop must never wait on it longer than ``timeout``, nor see an
exception from it. So:

* every socket operation, the connect included, is bounded by ``timeout``, whatever the URL's query
  options say (``?socket_timeout=20`` is lowered to ``timeout``), and redis-py's own retries and health
  checks are off (they would multiply the bound);
* any failure of a call (connection, timeout, a refused handshake such as ``DB index is out of range``,
  a reply that is not Redis) marks the tier *down*: calls then answer at once (miss / ``FAILED``) without
  touching the network, while a background thread pings the server every second; the first ping that
  succeeds marks it up again. So a dead or hung server costs a caller (the scheduler's ``contains``
  included) one bounded wait, then nothing until it is back. Each transition, and each new kind of
  failure while down, is logged once, without a traceback;
* each batch is one pipelined round trip (``SET``/``GET``/``EXISTS``), so a batch costs one timeout at
  most, not one per chunk. A command the server refuses inside a batch (out of memory, wrong type) fails
  that chunk only and is logged once per kind.

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
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar
from urllib.parse import unquote, urlparse

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvoffload.config import ConfigError, redact_url
from kvoffload.tiers.base import ChunkTier, PutResult, TierStats
from kvoffload.tiers.disk import (HEADER_SIZE, BadEntry, OnceLog, byte_view, check_header, pack_header,
                                  unpack_header)

if TYPE_CHECKING:
    from kvoffload.config import Settings

logger = logging.getLogger(__name__)

KEY_PREFIX = b"kvoffload:"
_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
#: How often a down tier pings the server; short, so a restarted server is used again quickly.
_RETRY_SECONDS = 1.0
MAC_SIZE = hashlib.sha256().digest_size
#: Signed first, so a signature made with the same secret for another purpose never verifies here.
_MAC_CONTEXT = b"kvoffload remote entry v1\0"
_T = TypeVar("_T")


def connect(url: str, password: str | None, timeout: float) -> redis.Redis:
    """A client for ``url`` whose every socket operation ends within ``timeout`` seconds.

    ``password`` wins over one in the URL (the settings resolve ``KVOFFLOAD_REMOTE_PASSWORD`` first).
    redis-py lets the URL's query options override keyword arguments, so the options that would lengthen
    a call or change the replies' types are set after the URL is parsed: a timeout in the URL may only
    shorten ``timeout``.
    """
    parsed = urlparse(url)
    scheme = _SCHEMES.get(parsed.scheme)
    if scheme is None or not parsed.hostname:
        raise ConfigError(f"remote_url {redact_url(url)!r}: expected redis://, rediss://, valkey:// or valkeys:// "
                          f"with a host")
    if password is None and parsed.password:
        password = unquote(parsed.password)
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    if parsed.username:
        netloc = f"{parsed.username}@{netloc}"
    # The password travels as an argument, not in the URL that redis-py may echo in its messages.
    clean = parsed._replace(scheme=scheme, netloc=netloc).geturl()
    pool = redis.ConnectionPool.from_url(clean, password=password)
    options = pool.connection_kwargs
    for name in ("socket_timeout", "socket_connect_timeout"):
        asked = options.get(name)
        options[name] = min(asked, timeout) if asked and asked > 0 else timeout
    options.update(retry=Retry(NoBackoff(), 0), retry_on_error=[], retry_on_timeout=False,
                   health_check_interval=0, decode_responses=False)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


class RedisTier(ChunkTier):
    """Chunk payloads in a Redis or Valkey server, with optional expiry (``ttl`` seconds)."""

    name = "redis"

    def __init__(self, url: str, fingerprint: bytes, password: str | None, timeout: float,
                 ttl: float | None, auth_key: bytes | None = None) -> None:
        if len(fingerprint) != 32:
            raise ValueError(f"fingerprint must be 32 bytes, got {len(fingerprint)}")
        self.fingerprint = fingerprint
        self._auth_key = auth_key
        self.stats = TierStats()
        self._client = connect(url, password, timeout)
        self._secret = password or (unquote(urlparse(url).password or "") or None)
        self._where = redact_url(url)
        self._prefix = KEY_PREFIX + fingerprint.hex()[:16].encode() + b":"
        self._px = max(1, round(ttl * 1000)) if ttl else None
        self._lock = threading.Lock()
        self._down = False
        self._last_failure = ""  # the failure last logged in this outage, so a new kind is logged once
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()
        self._removed: list[bytes] = []
        self._log = OnceLog(logger)
        if self._run(self._client.ping) is not None:
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

        def send() -> list:  # builds the values only when the server is asked: no copies while down
            pipe = self._client.pipeline(transaction=False)
            for key, view in views:
                pipe.set(self._name(key), self._value(key, view), px=self._px)
            return _expect(pipe.execute(raise_on_error=False), lambda reply: reply is True)

        replies = self._run(send)
        elapsed = time.perf_counter() - start
        if replies is None:
            with self._lock:
                self.stats.errors += len(items)
            return [PutResult.FAILED] * len(items)
        results = [PutResult.FAILED if isinstance(reply, Exception) else PutResult.STORED for reply in replies]
        with self._lock:
            self.stats.errors += results.count(PutResult.FAILED)
            self.stats.writes += results.count(PutResult.STORED)
            self.stats.bytes_written += sum(view.nbytes for (_, view), result in zip(views, results)
                                            if result is PutResult.STORED)
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

        def fetch() -> list:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            return _expect(pipe.execute(raise_on_error=False), lambda reply: reply is None or isinstance(reply, bytes))

        replies = self._run(fetch)
        if replies is None:
            with self._lock:
                self.stats.errors += len(items)
                self.stats.misses += len(items)
            return [False] * len(items)
        results: list[bool] = []
        corrupt: list[bytes] = []
        nbytes = 0
        for (key, out), reply in zip(items, replies):
            out = byte_view(out)
            if reply is None or isinstance(reply, Exception):
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
            self.stats.errors += sum(isinstance(r, Exception) for r in replies)
            self.stats.corrupt += len(corrupt)
            self.stats.bytes_read += nbytes
            self.stats.read_seconds += elapsed
            self._removed.extend(corrupt)
        if corrupt:
            self._run(lambda: self._client.delete(*(self._name(key) for key in corrupt)))
        return results

    def contains(self, keys: Iterable[bytes]) -> list[bool]:
        names = [self._name(key) for key in keys]
        if not names:
            return []

        def exists() -> list:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return pipe.execute(raise_on_error=False)

        replies = self._run(exists)
        if replies is None:
            return [False] * len(names)
        return [reply == 1 for reply in replies]

    def drain_removed(self) -> list[bytes]:
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    def close(self) -> None:
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=2 * _RETRY_SECONDS)
        self._client.close()

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

    def _run(self, call: Callable[[], _T]) -> _T | None:
        """``call()``, or None at once while the tier is down, or None after a failure (marks it down)."""
        if self._down:
            return None
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - whatever the server does, the engine must not see it
            self._mark_down(exc)
            return None

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            was_down, self._down = self._down, True
            if self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe, name="kvoffload-redis-probe", daemon=True)
                self._prober.start()
        # Drop idle sockets to the old server: after a restart each would fail once more.
        self._client.connection_pool.disconnect(inuse_connections=False)
        if not was_down:
            self._last_failure = self._describe(exc)
            logger.warning("kvoffload remote tier %s is down (%s); loads and stores skip it and it is retried "
                           "every %.0f s", self._where, self._last_failure, _RETRY_SECONDS)

    def _probe(self) -> None:
        """While down: ping every ``_RETRY_SECONDS`` on this thread, so no caller ever waits for a probe."""
        while not self._closed.wait(_RETRY_SECONDS):
            try:
                self._client.ping()
            except Exception as exc:  # noqa: BLE001 - a probe that fails for any reason is retried later
                self._client.connection_pool.disconnect(inuse_connections=False)
                failure = self._describe(exc)
                if failure != self._last_failure:
                    self._last_failure = failure
                    logger.warning("kvoffload remote tier %s is still down (%s); retried every %.0f s", self._where,
                                   failure, _RETRY_SECONDS)
                continue
            with self._lock:
                self._down, self._prober = False, None
            logger.warning("kvoffload remote tier %s is back up", self._where)
            return
        with self._lock:
            self._prober = None

    def _describe(self, exc: Exception) -> str:
        """One line for a log: the failure's kind and message, the password masked, with a hint if known."""
        text = f"{type(exc).__name__}: {self._mask(str(exc))}"
        if isinstance(exc, redis.ResponseError) and "DB index" in str(exc):
            text += "; the database number of remote_url does not exist on this server (see its `databases`)"
        elif isinstance(exc, redis.exceptions.InvalidResponse):
            text += "; the server does not speak the Redis protocol: check the host and port of remote_url"
        return text

    def _log_refusal(self, command: str, exc: Exception) -> None:
        kind = type(exc).__name__
        self._log.warning(f"{command}:{kind}", "kvoffload remote tier %s refused %s: %s: %s", self._where, command,
                          kind, self._mask(str(exc)))

    def _mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _expect(replies: list, valid: Callable[[object], bool]) -> list:
    """``replies`` with each one that is neither an error nor ``valid`` turned into an error: a server that
    is not quite Redis must not hand an integer to the checksum code."""
    return [reply if isinstance(reply, Exception) or valid(reply)
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
    """Delete every kvoffload chunk on the server (other keys are left alone); returns how many."""
    removed = 0
    for batch in _batches(_names(client)):
        removed += client.unlink(*batch)
    return removed
