"""Remote-tier GB/s: one redis-server against a 3-master Redis Cluster, side by side in one run (not a test).

Starts both on free 127.0.0.1 ports (the helpers of ``tests/``), then through :class:`RedisTier`, as the
connector uses it, puts and gets ``--chunks`` chunks of ``--chunk-mb`` MB in batches of ``--batch`` (a
batch is one pipeline per server it touches; the cluster sends its per-master pipelines in parallel).
Each figure is the median of ``--reps`` passes over every chunk; it prints a Markdown table with the
cluster-to-single ratio. All servers share this host's cores with the client, so on a small machine the
ratio shows the cost of the routing more than the gain of spreading the load over hosts.

    PYTHONPATH=src:. python benchmarks/remote_cluster.py [--chunks 64] [--chunk-mb 4] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from kvoffload.tiers.base import PutResult
from kvoffload.tiers.redis_tier import RedisTier
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer

FINGERPRINT = bytes(range(32))
TIMEOUT = 5.0  # generous: a benchmark measures throughput, not the outage path


def passes(tier: RedisTier, chunks: list[memoryview], batch: int, reps: int) -> tuple[float, float]:
    """Median put and get GB/s over ``reps`` passes; every chunk must be stored and read back."""
    keys = [i.to_bytes(32, "big") for i in range(len(chunks))]
    outs = [memoryview(bytearray(len(c))) for c in chunks]
    total = sum(len(c) for c in chunks)
    put_rates, get_rates = [], []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(0, len(chunks), batch):
            results = tier.put_many(list(zip(keys[i:i + batch], chunks[i:i + batch])))
            assert results == [PutResult.STORED] * len(results), results
        put_rates.append(total / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        for i in range(0, len(chunks), batch):
            assert all(tier.get_many_into(list(zip(keys[i:i + batch], outs[i:i + batch]))))
        get_rates.append(total / (time.perf_counter() - start) / 1e9)
    assert all(bytes(o[:64]) == bytes(c[:64]) for o, c in zip(outs, chunks))
    return statistics.median(put_rates), statistics.median(get_rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    size = int(args.chunk_mb * 1e6)
    chunks = [memoryview(os.urandom(size)) for _ in range(args.chunks)]
    rows = {}
    with RedisServer() as server, RedisCluster() as cluster:
        for name, url in (("single", server.url), ("cluster-3", cluster.url)):
            tier = RedisTier(url, FINGERPRINT, None, TIMEOUT, None)
            rows[name] = passes(tier, chunks, args.batch, args.reps)
            tier.close()
    print(f"{args.chunks} chunks of {args.chunk_mb:g} MB, batches of {args.batch}, median of {args.reps}, "
          f"{os.cpu_count()} CPUs\n")
    print("| remote | put GB/s | get GB/s |\n|---|---:|---:|")
    for name, (put, get) in rows.items():
        print(f"| {name} | {put:.2f} | {get:.2f} |")
    (sp, sg), (cp, cg) = rows["single"], rows["cluster-3"]
    print(f"| cluster / single | {cp / sp:.2f}x | {cg / sg:.2f}x |")


if __name__ == "__main__":
    main()
