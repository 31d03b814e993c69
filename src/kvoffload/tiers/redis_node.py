"""One Redis/Valkey server as the remote tier sees it: a bounded client, and whether it is down.

A remote server may vanish, stall or come back different (fewer databases, a password, not Redis at
all) at any moment, and the inference loop must never wait on it longer than ``timeout``, nor see an
exception from it. So:

* every socket operation, the connect included, is bounded by ``timeout``, whatever the URL's query
  options say (``?socket_timeout=20`` is lowered to ``timeout``), and redis-py's own retries and health
  checks are off (they would multiply the bound);
* any failure of a call (connection, timeout, a refused handshake such as ``DB index is out of range``,
  a reply that is not Redis) marks the :class:`Node` *down*: calls then answer :data:`UNAVAILABLE` at once
  without touching the network, while a background thread pings the server every second; the first ping
  that succeeds marks it up again. So a dead or hung server costs a caller one bounded wait, then nothing
  until it is back. Each transition, and each new kind of failure while down, is logged once, without a
  traceback.

:class:`Single` sends a batch of commands to one node as one pipelined round trip; a cluster
(:mod:`kvoffload.tiers.redis_cluster`) sends one pipeline to each node that owns some of the keys.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.retry import Retry

from kvoffload.config import ConfigError, redact_url

logger = logging.getLogger("kvoffload.tiers.redis_tier")  # one logger for the remote tier, whatever the module

_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
#: How often a down node is pinged; short, so a restarted server is used again quickly.
RETRY_SECONDS = 1.0
_T = TypeVar("_T")
#: Queues the command for item ``i`` of a batch on a pipeline: values are built only for a node that is asked.
Queue = Callable[[Pipeline, int], None]


class Unavailable:
    """The reply for a command that was not sent (its node is down) or whose batch failed."""

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = Unavailable()


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
                          f"with a host, or redis+cluster://")
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


class Node:
    """One server: ``run`` a call on its client, or get :data:`UNAVAILABLE` at once while it is down."""

    def __init__(self, client: redis.Redis, where: str, secret: str | None) -> None:
        self.client = client
        self.where = where  # for logs: the redacted URL, and the node's address in a cluster
        self._secret = secret
        self._lock = threading.Lock()
        self.down = False
        self._last_failure = ""  # the failure last logged in this outage, so a new kind is logged once
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()

    def run(self, call: Callable[[], _T]) -> _T | Unavailable:
        """``call()``, or UNAVAILABLE at once while down, or UNAVAILABLE after a failure (marks it down)."""
        if self.down:
            return UNAVAILABLE
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - whatever the server does, the engine must not see it
            self._mark_down(exc)
            return UNAVAILABLE

    def pipelined(self, count: int, queue: Queue) -> list:
        """The replies of ``count`` queued commands in one round trip: each a value or the error the server
        answered for that command, or all UNAVAILABLE."""
        def send() -> list:
            pipe = self.client.pipeline(transaction=False)
            for i in range(count):
                queue(pipe, i)
            return pipe.execute(raise_on_error=False)

        replies = self.run(send)
        return [UNAVAILABLE] * count if replies is UNAVAILABLE else replies

    def mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def close(self) -> None:
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=2 * RETRY_SECONDS)
        self.client.close()

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            was_down, self.down = self.down, True
            if self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe, name="kvoffload-redis-probe", daemon=True)
                self._prober.start()
        # Drop idle sockets to the old server: after a restart each would fail once more.
        self.client.connection_pool.disconnect(inuse_connections=False)
        if not was_down:
            self._last_failure = self._describe(exc)
            logger.warning("kvoffload remote tier %s is down (%s); loads and stores skip it and it is retried "
                           "every %.0f s", self.where, self._last_failure, RETRY_SECONDS)

    def _probe(self) -> None:
        """While down: ping every ``RETRY_SECONDS`` on this thread, so no caller ever waits for a probe."""
        while not self._closed.wait(RETRY_SECONDS):
            try:
                self.client.ping()
            except Exception as exc:  # noqa: BLE001 - a probe that fails for any reason is retried later
                self.client.connection_pool.disconnect(inuse_connections=False)
                failure = self._describe(exc)
                if failure != self._last_failure:
                    self._last_failure = failure
                    logger.warning("kvoffload remote tier %s is still down (%s); retried every %.0f s", self.where,
                                   failure, RETRY_SECONDS)
                continue
            with self._lock:
                self.down, self._prober = False, None
            logger.warning("kvoffload remote tier %s is back up", self.where)
            return
        with self._lock:
            self._prober = None

    def _describe(self, exc: Exception) -> str:
        """One line for a log: the failure's kind and message, the password masked, with a hint if known."""
        text = f"{type(exc).__name__}: {self.mask(str(exc))}"
        if isinstance(exc, redis.ResponseError) and "DB index" in str(exc):
            text += "; the database number of remote_url does not exist on this server (see its `databases`)"
        elif isinstance(exc, redis.ResponseError) and "cluster support disabled" in str(exc):
            text += "; this server is not in cluster mode: use redis:// in remote_url, not redis+cluster://"
        elif isinstance(exc, redis.exceptions.InvalidResponse):
            text += "; the server does not speak the Redis protocol: check the host and port of remote_url"
        return text


class Single:
    """A remote tier of one server: every batch is one pipeline to it."""

    def __init__(self, url: str, password: str | None, timeout: float, secret: str | None) -> None:
        self.node = Node(connect(url, password, timeout), redact_url(url), secret)

    @property
    def nodes(self) -> list[Node]:
        return [self.node]

    def start(self) -> bool:
        """Whether the server answers now (if not, it is down and probed)."""
        return self.node.run(self.node.client.ping) is not UNAVAILABLE

    def batch(self, names: list[bytes], queue: Queue) -> list:
        """One reply per name (see :meth:`Node.pipelined`); ``queue(pipe, i)`` queues the command of ``names[i]``."""
        return self.node.pipelined(len(names), queue)

    def close(self) -> None:
        self.node.close()
