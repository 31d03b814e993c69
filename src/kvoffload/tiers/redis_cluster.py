"""The remote tier on a Redis Cluster or Valkey Cluster (``redis+cluster://host:port,host:port/``).

Keys spread over the masters by hash slot (kvoffload's keys have no ``{hash tag}``, so a prompt's chunks
land on every master). A batch is split by the node that owns each key's slot and each part is one
pipeline to its node, the parts sent in parallel: a batch costs one round trip to each node it touches
and waits for the slowest, not one round trip per key.

Why not redis-py's ``RedisCluster``: its pipeline fails the whole batch when one master cannot be
reached (a ``ConnectionError`` for every key), and resends a failed command one key at a time; a cache
must instead miss only the keys of the lost master, within one ``timeout``. So each master is a
:class:`~kvoffload.tiers.redis_node.Node` of its own, down and probed alone: its keys miss (and their
writes fail) while the others keep serving.

The slot table comes from ``CLUSTER SLOTS`` of any node that answers, read at start, and again (at most
once per second, on the caller's thread, from a node that is up) when the table has a gap, a node of it
is down (a failover may have moved its slots) or a node answered ``MOVED``. ``MOVED`` and ``ASK`` replies
(a resharding moves slots under a running engine) are followed once: the command is resent to the node
named, with ``ASKING`` first for ``ASK``; a command redirected again is a refused one (a miss).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import AskError, MovedError

from kvoffload.config import cluster_url, redact_url
from kvoffload.tiers.redis_node import RETRY_SECONDS, UNAVAILABLE, Node, Queue, connect

#: Threads that send the per-node pipelines of one batch at once; more nodes than this wait their turn.
_SENDERS = 16


class Cluster:
    """A remote tier of a cluster's masters: every batch is one pipeline per master it touches."""

    def __init__(self, url: str, password: str | None, timeout: float, secret: str | None) -> None:
        self._url = cluster_url(url)
        self._password, self._timeout, self._secret = password, timeout, secret
        self._where = redact_url(url)
        self._lock = threading.Lock()
        self._nodes: dict[tuple[str, int], Node] = {}
        self._seeds = [self._node(host, port) for host, port in self._url.nodes]
        self._slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._stale = True
        self._refreshed_at = -math.inf
        self._senders = ThreadPoolExecutor(_SENDERS, thread_name_prefix="kvoffload-redis-cluster")

    @property
    def nodes(self) -> list[Node]:
        """The masters that own slots now (for the CLI: each one's keys are listed or cleared)."""
        with self._lock:
            return list(dict.fromkeys(node for node in self._slots if node is not None))

    def start(self) -> bool:
        """Whether the slot table could be read now (if not, every key misses until a node answers)."""
        self._refresh()
        return not self._stale

    def batch(self, names: list[bytes], queue: Queue) -> list:
        """One reply per name: a value, the error its node answered, or UNAVAILABLE (node down, slot unowned)."""
        if self._stale and time.monotonic() - self._refreshed_at >= RETRY_SECONDS:
            self._refresh()
        replies: list = [UNAVAILABLE] * len(names)
        route: dict[tuple[Node, bool], list[int]] = {}
        with self._lock:
            for i, name in enumerate(names):
                node = self._slots[key_slot(name)]
                if node is None:
                    self._stale = True
                else:
                    route.setdefault((node, False), []).append(i)
        for redirected in (False, True):  # the first send, then once more for what MOVED or ASK redirected
            again: dict[tuple[Node, bool], list[int]] = {}
            for i, reply in self._send(route, queue):
                replies[i] = reply
                if reply is UNAVAILABLE:
                    self._stale = True
                elif isinstance(reply, AskError) and not redirected:  # MovedError is an AskError too
                    moved = isinstance(reply, MovedError)
                    target = self._node(reply.host, reply.port)
                    if moved:
                        with self._lock:
                            self._slots[reply.slot_id] = target
                        self._stale = True  # one MOVED often means more slots moved
                    again.setdefault((target, not moved), []).append(i)
            route = again
        return replies

    def close(self) -> None:
        self._senders.shutdown(wait=True)
        for node in list(self._nodes.values()):
            node.close()

    # ---------------------------------------------------------------- internals

    def _send(self, route: dict[tuple[Node, bool], list[int]], queue: Queue) -> list[tuple[int, object]]:
        """(index, reply) for every routed index: one pipeline per (node, asking), in parallel."""
        def one(node: Node, asking: bool, indices: list[int]) -> list[tuple[int, object]]:
            def queue_one(pipe, j: int) -> None:
                if asking:  # ASKING lets the importing node serve the next command of this connection
                    pipe.execute_command("ASKING")
                queue(pipe, indices[j])

            replies = node.pipelined(len(indices), queue_one)
            if asking and replies and replies[0] is not UNAVAILABLE:
                replies = replies[1::2]
            elif asking:
                replies = [UNAVAILABLE] * len(indices)
            return list(zip(indices, replies))

        parts = [(node, asking, indices) for (node, asking), indices in route.items()]
        if len(parts) == 1:
            return one(*parts[0])
        futures = [self._senders.submit(one, *part) for part in parts]
        return [pair for future in futures for pair in future.result()]

    def _node(self, host: str, port: int) -> Node:
        with self._lock:
            node = self._nodes.get((host, port))
            if node is None:
                client = connect(self._url.node_url(host, port), self._password, self._timeout)
                node = self._nodes[(host, port)] = Node(client, f"{self._where} node {host}:{port}", self._secret)
            return node

    def _refresh(self) -> None:
        """Read the slot table from the first node that is up and answers, seeds last."""
        self._refreshed_at = time.monotonic()
        with self._lock:
            known = [node for node in self._slots if node is not None]
        for node in dict.fromkeys([*known, *self._seeds]):
            if node.down:
                continue
            slots = node.run(lambda: self._read_slots(node))  # a reply it cannot parse marks the node down
            if slots is UNAVAILABLE:
                continue
            with self._lock:
                self._slots = slots
            self._stale = None in slots or any(owner.down for owner in set(slots) if owner is not None)
            return

    def _read_slots(self, node: Node) -> list[Node | None]:
        """The owner of each slot by ``CLUSTER SLOTS`` of ``node`` (None: no master has it)."""
        slots: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, master, *_replicas in node.client.execute_command("CLUSTER SLOTS"):
            host = master[0].decode() if master[0] else node.client.connection_pool.connection_kwargs["host"]
            owner = self._node(host, int(master[1]))  # an empty host is the node asked
            slots[start:end + 1] = [owner] * (end + 1 - start)
        return slots
