"""The Redis/Valkey tier against a real redis-server: round trip, expiry, corruption, outages, passwords."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Iterator

import pytest
import redis

from kvoffload.config import ConfigError, load_settings
from kvoffload.keys import with_state_key
from kvoffload.tiers import redis_node, redis_tier
from kvoffload.tiers.base import PutResult
from kvoffload.tiers.disk import HEADER_SIZE
from kvoffload.tiers.redis_tier import RedisTier
from kvoffload.vllm.persistent import PersistentLookup
from tests.redis_server import RedisServer

FP = bytes(range(32))
OTHER_FP = bytes(range(1, 33))
CHUNK = 4096
TIMEOUT = 0.2


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def payload(i: int) -> memoryview:
    return memoryview(bytes((i + j) % 251 for j in range(CHUNK)))


def read(tier: RedisTier, k: bytes) -> bytes | None:
    out = bytearray(CHUNK)
    return bytes(out) if tier.get_into(k, memoryview(out)) else None


def raw_name(k: bytes, fp: bytes = FP) -> bytes:
    return f"kvoffload:{fp.hex()[:16]}:{k.hex()}".encode()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class NotRedis:
    """A TCP server on ``port`` that answers every request with bytes that are not the Redis protocol."""

    def __init__(self, port: int) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"?not redis\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()
        self._thread.join()


@pytest.fixture
def tier(redis_server: RedisServer) -> RedisTier:
    t = RedisTier(redis_server.url, FP, None, TIMEOUT, None)
    yield t
    t.close()


def test_round_trip_batched(tier: RedisTier, redis_server: RedisServer) -> None:
    items = [(key(i), payload(i)) for i in range(5)]
    assert tier.put_many(items) == [PutResult.STORED] * 5
    outs = [bytearray(CHUNK) for _ in range(6)]
    got = tier.get_many_into([(key(i), memoryview(outs[i])) for i in range(6)])
    assert got == [True] * 5 + [False]
    assert all(outs[i] == bytes(payload(i)) for i in range(5))
    assert tier.contains([key(0), key(9)]) == [True, False]
    assert (tier.stats.hits, tier.stats.misses, tier.stats.bytes_written) == (5, 1, 5 * CHUNK)
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.strlen(raw_name(key(0))) == HEADER_SIZE + CHUNK
    assert raw.ttl(raw_name(key(0))) == -1  # no expiry without ttl


def test_valkey_scheme_and_another_fingerprint(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("redis://", "valkey://")
    mine, other = RedisTier(url, FP, None, TIMEOUT, None), RedisTier(url, OTHER_FP, None, TIMEOUT, None)
    mine.put(key(1), payload(1))
    assert other.contains([key(1)]) == [False] and read(other, key(1)) is None


def test_ttl_expiry(redis_server: RedisServer) -> None:
    tier = RedisTier(redis_server.url, FP, None, TIMEOUT, ttl=0.2)
    tier.put(key(1), payload(1))
    assert 0 < redis.Redis.from_url(redis_server.url).pttl(raw_name(key(1))) <= 200
    assert read(tier, key(1)) == bytes(payload(1))
    time.sleep(0.3)
    assert tier.contains([key(1)]) == [False] and read(tier, key(1)) is None


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "foreign_fingerprint"])
def test_bad_value_is_a_miss_and_deleted(tier: RedisTier, redis_server: RedisServer, damage: str) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    if damage == "foreign_fingerprint":
        other = RedisTier(redis_server.url, OTHER_FP, None, TIMEOUT, None)
        other.put(key(1), payload(1))
        raw.rename(raw_name(key(1), OTHER_FP), raw_name(key(1)))
    else:
        tier.put(key(1), payload(1))
        value = bytearray(raw.get(raw_name(key(1))))
        if damage == "flip_payload":
            value[HEADER_SIZE + 7] ^= 0x10
        else:
            del value[-1]
        raw.set(raw_name(key(1)), bytes(value))
    assert read(tier, key(1)) is None
    assert tier.stats.corrupt == 1
    assert raw.exists(raw_name(key(1))) == 0
    assert tier.drain_removed() == [key(1)]


def test_server_killed_then_restarted(tier: RedisTier, redis_server: RedisServer,
                                      caplog: pytest.LogCaptureFixture) -> None:
    tier.put(key(1), payload(1))
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger="kvoffload.tiers.redis_tier"):
        for _ in range(20):
            start = time.monotonic()
            assert read(tier, key(1)) is None
            assert tier.put(key(2), payload(2)) is PutResult.FAILED
            assert tier.contains([key(1)]) == [False]
            assert time.monotonic() - start < 5 * TIMEOUT
        assert tier.stats.errors >= 20
        redis_server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 5
        while tier.put(key(3), payload(3)) is not PutResult.STORED:
            assert time.monotonic() < deadline, "the tier did not come back after the server restarted"
            time.sleep(0.1)
        assert read(tier, key(3)) == bytes(payload(3))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is down" in m for m in messages) == 1
    assert sum("is back up" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_stalled_server_is_bounded_by_the_timeout(tier: RedisTier, redis_server: RedisServer) -> None:
    tier.put(key(1), payload(1))
    redis_server.pause()
    try:
        start = time.monotonic()
        assert read(tier, key(1)) is None  # times out and marks the tier down
        assert time.monotonic() - start < 5 * TIMEOUT
        start = time.monotonic()
        assert tier.put_many([(key(i), payload(i)) for i in range(10)]) == [PutResult.FAILED] * 10
        assert time.monotonic() - start < 0.05  # down: answered without touching the network
    finally:
        redis_server.resume()
    wait_until(lambda: read(tier, key(1)) == bytes(payload(1)), "the tier did not come back after the stall")


def test_server_down_at_start_fails_soft() -> None:
    server = RedisServer()  # not started: nothing listens on the port
    try:
        start = time.monotonic()
        tier = RedisTier(server.url, FP, None, TIMEOUT, None)
        assert tier.put(key(1), payload(1)) is PutResult.FAILED
        assert read(tier, key(1)) is None
        assert time.monotonic() - start < 5 * TIMEOUT
    finally:
        server.close()


@pytest.mark.parametrize("via", ["url", "argument"])
def test_password_works_and_is_never_logged(via: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-Pa55"
    with RedisServer(password=secret) as server, caplog.at_level(logging.DEBUG):
        url = server.url.replace("redis://", f"redis://:{secret}@") if via == "url" else server.url
        tier = RedisTier(url, FP, None if via == "url" else secret, TIMEOUT, None)
        assert tier.put(key(1), payload(1)) is PutResult.STORED
        assert read(tier, key(1)) == bytes(payload(1))
        server.stop()
        assert read(tier, key(1)) is None
        server.start()
        wait_until(lambda: tier.put(key(1), payload(1)) is PutResult.STORED, "the tier did not come back")
        wrong = RedisTier(server.url.replace("redis://", f"redis://:{secret}@"), FP, "wrong-" + secret,
                          TIMEOUT, None)  # the argument wins over the URL
        assert wrong.put(key(2), payload(2)) is PutResult.FAILED
    assert any("is down" in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text
    assert not any(secret in str(r.args) for r in caplog.records)


def test_bad_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected redis://"):
        RedisTier("http://:pw@localhost:1/0", FP, None, TIMEOUT, None)


def test_list_keys_and_clear(tier: RedisTier, redis_server: RedisServer) -> None:
    other = RedisTier(redis_server.url, OTHER_FP, None, TIMEOUT, None)
    tier.put_many([(key(i), payload(i)) for i in range(3)])
    other.put(key(7), payload(7))
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(b"unrelated", b"keep")
    entries = redis_tier.list_keys(raw)
    assert sorted((e.namespace, e.key) for e in entries) == sorted(
        [(FP.hex()[:16], key(i)) for i in range(3)] + [(OTHER_FP.hex()[:16], key(7))])
    assert {e.bytes for e in entries} == {HEADER_SIZE + CHUNK}
    assert redis_tier.clear(raw) == 4
    assert redis_tier.list_keys(raw) == [] and raw.get(b"unrelated") == b"keep"


def test_tls_schemes_use_tls_and_retries_are_off() -> None:
    for url, connection_class in [("rediss://h:1/0", redis.SSLConnection), ("valkeys://h:1/0", redis.SSLConnection),
                                  ("valkey://h:1/0", redis.Connection)]:
        pool = redis_node.connect(url, None, 0.1).connection_pool
        assert pool.connection_class is connection_class
        assert pool.connection_kwargs["retry"].get_retries() == 0  # retries would multiply the timeout


def test_server_out_of_memory_fails_the_writes_not_the_tier(tier: RedisTier, redis_server: RedisServer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    raw = redis.Redis.from_url(redis_server.url)
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", 1)  # every write is refused with OOM
    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.redis_tier"):
        assert tier.put_many([(key(i), payload(i)) for i in range(3)]) == [PutResult.FAILED] * 3
    assert tier.stats.errors == 3
    assert len(caplog.records) == 1 and "OutOfMemoryError" in caplog.records[0].getMessage()
    raw.config_set("maxmemory", 0)
    assert tier.put(key(1), payload(1)) is PutResult.STORED  # never marked down


def test_server_restarted_with_fewer_databases_is_a_miss_until_fixed(redis_server: RedisServer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(redis_server.url.replace("/0", "/3"), FP, None, TIMEOUT, None)
    assert tier.put(key(1), payload(1)) is PutResult.STORED
    redis_server.stop()
    redis_server.start("--databases", "1")  # SELECT 3 now answers "DB index is out of range"
    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.redis_tier"):
        for _ in range(5):
            assert read(tier, key(1)) is None
            assert tier.put(key(2), payload(2)) is PutResult.FAILED
            assert tier.contains([key(1)]) == [False]
        assert tier.stats.errors >= 10
        redis_server.stop()
        redis_server.start()
        wait_until(lambda: tier.put(key(3), payload(3)) is PutResult.STORED,
                   "the tier did not come back once the server had its databases again")
        assert read(tier, key(3)) == bytes(payload(3))
    down = [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
    assert len(down) == 1 and "DB index is out of range" in down[0] and "databases" in down[0]
    assert not any(r.exc_info for r in caplog.records)
    tier.close()


def test_url_options_cannot_raise_the_timeout(redis_server: RedisServer) -> None:
    url = redis_server.url + "?socket_timeout=20&socket_connect_timeout=20&health_check_interval=1"
    tier = RedisTier(url, FP, None, 0.5, None)
    assert tier.put(key(1), payload(1)) is PutResult.STORED
    redis_server.pause()
    try:
        start = time.monotonic()
        assert read(tier, key(1)) is None
        assert time.monotonic() - start < 3  # remote_timeout is 0.5 s; the URL's 20 s must not apply
    finally:
        redis_server.resume()
    tier.close()


def test_probe_that_meets_a_server_that_is_not_redis(redis_server: RedisServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    tier = RedisTier(redis_server.url, FP, None, TIMEOUT, None)
    tier.put(key(1), payload(1))
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.redis_tier"):
        assert read(tier, key(1)) is None  # marks the tier down
        stranger = NotRedis(redis_server.port)
        try:
            newcomer = RedisTier(redis_server.url, OTHER_FP, None, TIMEOUT, None)  # opened against it: fails soft
            assert newcomer.put(key(1), payload(1)) is PutResult.FAILED
            newcomer.close()
            wait_until(lambda: any("still down (InvalidResponse" in r.getMessage() for r in caplog.records),
                       "the failed probe was not logged")
            time.sleep(1.5)  # more probes meet the same stranger
            for _ in range(5):
                assert read(tier, key(1)) is None
        finally:
            stranger.close()
        redis_server.start()
        wait_until(lambda: tier.put(key(2), payload(2)) is PutResult.STORED,
                   "the tier did not come back after the stranger left")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("still down (InvalidResponse" in m for m in messages) == 1  # once, not once per probe
    assert sum("is back up" in m for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)
    tier.close()


def test_hung_server_costs_the_scheduler_one_bounded_wait(redis_server: RedisServer) -> None:
    keys = [key(i) for i in range(4)]
    writer = RedisTier(redis_server.url, FP, None, TIMEOUT, None)
    writer.put_many([(k, payload(i)) for i, k in enumerate(keys)])
    settings = load_settings({"remote_url": redis_server.url, "remote_timeout": TIMEOUT}, environ={})
    lookup = PersistentLookup(settings, FP)
    assert len(lookup.leading(keys)) == 4
    redis_server.pause()
    try:
        start = time.monotonic()
        assert len(lookup.leading(keys)) == 0  # the one wait: remote_timeout
        assert time.monotonic() - start < 5 * TIMEOUT
        slowest, until = 0.0, time.monotonic() + 2.5  # past two probe intervals
        while time.monotonic() < until:
            start = time.monotonic()
            assert len(lookup.leading(keys)) == 0
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.01)
        assert slowest < 0.05, f"a lookup waited {slowest:.3f} s on a server known to be down"
    finally:
        redis_server.resume()
    wait_until(lambda: len(lookup.leading(keys)) == 4, "the lookup did not see the server come back")
    lookup.close()
    writer.close()


KEY_A, KEY_B = b"a" * 32, b"b" * 32


def signed_tier(server: RedisServer, auth_key: bytes | None) -> RedisTier:
    return RedisTier(server.url, FP, None, TIMEOUT, None, auth_key)


def test_signed_entries_need_the_same_secret(redis_server: RedisServer) -> None:
    signed_tier(redis_server, KEY_A).put_many([(key(i), payload(i)) for i in range(3)])
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.strlen(raw_name(key(0))) == HEADER_SIZE + CHUNK + redis_tier.MAC_SIZE
    same = signed_tier(redis_server, KEY_A)
    assert read(same, key(0)) == bytes(payload(0)) and same.stats.corrupt == 0
    for reader, k in [(signed_tier(redis_server, KEY_B), key(1)), (signed_tier(redis_server, None), key(2))]:
        assert read(reader, k) is None
        assert reader.stats.corrupt == 1 and reader.drain_removed() == [k]
        assert raw.exists(raw_name(k)) == 0  # deleted, like any entry that must not be served


@pytest.mark.parametrize("forgery", ["unsigned", "wrong_signature", "payload_swapped"])
def test_forged_entry_with_a_valid_checksum_is_refused(redis_server: RedisServer, forgery: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """An attacker who can write to the server computes the header and xxh3 checksum as kvoffload does."""
    from kvoffload.tiers.disk import pack_header
    tier = signed_tier(redis_server, KEY_A)
    tier.put(key(1), payload(1))
    raw = redis.Redis.from_url(redis_server.url)
    evil = memoryview(bytes(CHUNK))  # same size, other content
    forged = pack_header(key(1), FP, evil) + bytes(evil)
    if forgery == "wrong_signature":
        forged += bytes(redis_tier.MAC_SIZE)
    elif forgery == "payload_swapped":  # the genuine signature kept, header and payload replaced
        forged += raw.get(raw_name(key(1)))[-redis_tier.MAC_SIZE:]
    raw.set(raw_name(key(1)), forged)
    out = bytearray(b"\x01" * CHUNK)
    with caplog.at_level(logging.WARNING, logger="kvoffload.tiers.redis_tier"):
        assert tier.get_into(key(1), memoryview(out)) is False
    assert out == b"\x01" * CHUNK  # nothing of the forgery reached the buffer
    assert tier.stats.corrupt == 1 and raw.exists(raw_name(key(1))) == 0
    assert ("not signed" if forgery == "unsigned" else "signature mismatch") in caplog.text
    assert KEY_A.decode() not in caplog.text


def test_auth_key_file_from_the_settings(redis_server: RedisServer, tmp_path) -> None:
    secret = tmp_path / "kv.key"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    settings = load_settings({"remote_url": redis_server.url, "remote_auth_key_file": str(secret)}, environ={})
    assert settings.remote_auth_key() == b"0123456789abcdef0123456789abcdef"  # the newline is not part of it
    writer = RedisTier.from_settings(settings, FP)
    writer.put(key(1), payload(1))
    assert read(signed_tier(redis_server, b"0123456789abcdef0123456789abcdef"), key(1)) == bytes(payload(1))
    assert b"0123456789abcdef" not in b"".join(redis.Redis.from_url(redis_server.url).keys("*"))
    secret.write_text("short\n")
    with pytest.raises(ConfigError, match="remote_auth_key_file.*holds 5 bytes: expected at least 16"):
        RedisTier.from_settings(settings, FP)
    missing = load_settings({"remote_url": redis_server.url, "remote_auth_key_file": str(tmp_path / "none")},
                            environ={})
    with pytest.raises(ConfigError, match="cannot read remote_auth_key_file"):
        RedisTier.from_settings(missing, FP)


def test_lookup_tells_which_chunks_are_kept_with_their_state(redis_server: RedisServer) -> None:
    """A model with state groups: chunk 1 is in Redis with its state (under its own key), chunks 0 and 2 without;
    chunk 3 is missing. The lookup names the run 0-2 and which of it holds the state, in one round trip."""
    keys = [key(i) for i in range(10, 14)]
    writer = RedisTier(redis_server.url, FP, None, TIMEOUT, None)
    writer.put_many([(keys[0], payload(0)), (with_state_key(keys[1]), payload(1)), (keys[2], payload(2))])
    lookup = PersistentLookup(load_settings({"remote_url": redis_server.url, "remote_timeout": TIMEOUT},
                                            environ={}), FP)
    assert lookup.leading(keys, with_state=True) == [False, True, False]
    assert lookup.leading(keys) == [False]  # a model without state groups looks for plain keys only
    lookup.close()
    writer.close()
