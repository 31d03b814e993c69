"""The remote tier on a real 3-master Redis Cluster: spread by slot, one pipeline per node, a master lost
and back, slots moved under a running tier (MOVED and ASK)."""

from __future__ import annotations

import logging
import time
from collections import Counter

import pytest
import redis
from redis.crc import key_slot

from kvoffload.tiers.base import PutResult
from kvoffload.tiers.redis_node import Node
from kvoffload.tiers.redis_tier import RedisTier
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer
from tests.test_redis_tier import CHUNK, FP, TIMEOUT, key, payload, raw_name, read, wait_until

N = 30


@pytest.fixture
def tier(redis_cluster: RedisCluster) -> RedisTier:
    t = RedisTier(redis_cluster.url, FP, None, TIMEOUT, None)
    yield t
    t.close()


def owner(cluster: RedisCluster, k: bytes) -> int:
    """The index of the master that owns the slot of chunk ``k``, as the cluster says."""
    reply = cluster.client(0).execute_command("CLUSTER SLOTS")
    slot = key_slot(raw_name(k))
    [port] = [int(master[1]) for start, end, master, *_ in reply if start <= slot <= end]
    return cluster.index_of_port(port)


def test_keys_spread_over_the_masters_and_each_batch_is_one_pipeline_per_node(
        tier: RedisTier, redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    pipelined = Node.pipelined
    monkeypatch.setattr(Node, "pipelined", lambda node, count, queue: sent.append(count) or
                        pipelined(node, count, queue))
    assert tier.put_many([(key(i), payload(i)) for i in range(N)]) == [PutResult.STORED] * N
    assert len(sent) == 3 and sum(sent) == N  # one round trip per master, not one per key
    on_node = [redis_cluster.client(i).dbsize() for i in range(3)]
    assert sum(on_node) == N and all(on_node), f"keys per master: {on_node}"
    sent.clear()
    outs = [bytearray(CHUNK) for _ in range(N + 1)]
    assert tier.get_many_into([(key(i), memoryview(outs[i])) for i in range(N + 1)]) == [True] * N + [False]
    assert all(outs[i] == bytes(payload(i)) for i in range(N))
    assert len(sent) == 3
    assert tier.contains([key(0), key(N + 5), key(N - 1)]) == [True, False, True]
    assert (tier.stats.hits, tier.stats.misses, tier.stats.errors) == (N, 1, 0)


def test_a_master_killed_misses_its_keys_only_and_serves_again_after_restart(
        tier: RedisTier, redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture) -> None:
    tier.put_many([(key(i), payload(i)) for i in range(N)])
    where = [owner(redis_cluster, key(i)) for i in range(N)]
    lost = redis_cluster.masters[1]
    lost.stop()
    with caplog.at_level(logging.INFO, logger="kvoffload.tiers.redis_tier"):
        for _ in range(5):
            start = time.monotonic()
            outs = [bytearray(CHUNK) for _ in range(N)]
            got = tier.get_many_into([(key(i), memoryview(outs[i])) for i in range(N)])
            assert got == [w != 1 for w in where]
            assert all(outs[i] == bytes(payload(i)) for i in range(N) if got[i])
            assert tier.contains([key(i) for i in range(N)]) == [w != 1 for w in where]
            puts = tier.put_many([(key(i), payload(i)) for i in range(N, 2 * N)])
            fresh = [owner(redis_cluster, key(i)) for i in range(N, 2 * N)]
            assert puts == [PutResult.FAILED if w == 1 else PutResult.STORED for w in fresh]
            assert time.monotonic() - start < 5 * TIMEOUT
        assert tier.stats.errors > 0
        redis_cluster.restart(1)  # same port and nodes.conf, empty: it rejoins with its slots
        back = next(i for i in range(N) if where[i] == 1)
        wait_until(lambda: tier.put(key(back), payload(back)) is PutResult.STORED, "the master's slots did not "
                   "come back after it restarted")
        assert read(tier, key(back)) == bytes(payload(back))
    messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if "is down" in m]
    assert len(down) == 1 and f"node 127.0.0.1:{lost.port}" in down[0], down
    assert sum("is back up" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_reads_follow_slots_moved_by_a_resharding(tier: RedisTier, redis_cluster: RedisCluster) -> None:
    tier.put_many([(key(i), payload(i)) for i in range(N)])
    before = Counter(owner(redis_cluster, key(i)) for i in range(N))
    redis_cluster.reshard(0, 1, 5461)  # every slot of master 0, with its keys, to master 1
    after = Counter(owner(redis_cluster, key(i)) for i in range(N))
    assert after[0] == 0 and after[1] == before[0] + before[1]
    outs = [bytearray(CHUNK) for _ in range(N)]
    assert tier.get_many_into([(key(i), memoryview(outs[i])) for i in range(N)]) == [True] * N  # MOVED followed
    assert all(outs[i] == bytes(payload(i)) for i in range(N))
    assert tier.put_many([(key(i), payload(i)) for i in range(N, 2 * N)]) == [PutResult.STORED] * N
    assert tier.stats.errors == 0
    assert redis_cluster.client(0).dbsize() == 0


def test_a_slot_being_migrated_is_served_through_ask(tier: RedisTier, redis_cluster: RedisCluster) -> None:
    k = key(7)
    source = owner(redis_cluster, k)
    target = (source + 1) % 3
    slot = key_slot(raw_name(k))
    ids = [redis_cluster.client(i).execute_command("CLUSTER MYID").decode() for i in range(3)]
    redis_cluster.client(target).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
    redis_cluster.client(source).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
    # the key is not on the source, so the source answers ASK: the write and the read go to the target
    assert tier.put(k, payload(7)) is PutResult.STORED
    assert redis_cluster.client(target).dbsize() == 1 and redis_cluster.client(source).dbsize() == 0
    assert read(tier, k) == bytes(payload(7))
    assert tier.contains([k]) == [True] and tier.stats.errors == 0


def test_seeds_down_at_start_fail_soft(redis_cluster: RedisCluster) -> None:
    for master in redis_cluster.masters:
        master.stop()
    start = time.monotonic()
    tier = RedisTier(redis_cluster.url, FP, None, TIMEOUT, None)
    assert tier.put(key(1), payload(1)) is PutResult.FAILED
    assert read(tier, key(1)) is None and tier.contains([key(1)]) == [False]
    assert time.monotonic() - start < 5 * TIMEOUT
    tier.close()


def test_a_cluster_url_naming_a_plain_server_says_so(redis_server: RedisServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis+cluster://127.0.0.1:{redis_server.port}/"
    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.redis_tier"):
        tier = RedisTier(url, FP, None, TIMEOUT, None)
        assert tier.put(key(1), payload(1)) is PutResult.FAILED
    assert "not in cluster mode: use redis://" in caplog.text
    assert redis.Redis(port=redis_server.port).dbsize() == 0
    tier.close()
