"""Under load through the OpenAI server: concurrency, shared prefixes, a pool that evicts, a disk tier, and
clients that drop their streams.

The server is started with ``kvoffload serve`` (so the CLI path is tested too) on 127.0.0.1: a tiny host
pool and a small disk tier, 64 requests x 3 passes, 16 at a time, 4 families of 900-token prefixes with
short distinct suffixes; every 5th request is streamed and dropped after 2 chunks. Every completed
response must give the token ids the same prompt gives without kvoffload (tie-aware: ``tests/greedy.py``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import ROOT, run_engine
from tests.greedy import compare

pytestmark = pytest.mark.vllm

FAMILIES = [" ".join(str(f * 1000 + i) for i in range(900)) for f in range(4)]
PROMPTS = [f"{FAMILIES[i % 4]} {' '.join(['kv', 'cache', 'offload', 'token'][: 1 + i % 4])} {i}" for i in range(64)]
DROPPED = set(range(4, len(PROMPTS), 5))  # streamed, and the client goes away after 2 chunks
PASSES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(port: int, index: int) -> list[int] | None:
    """The completion's token ids, or None for a request whose client drops its stream."""
    body = {"model": "tiny", "prompt": PROMPTS[index], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    url = f"http://127.0.0.1:{port}/v1/completions"
    if index in DROPPED:
        with requests.post(url, timeout=300, stream=True, json={**body, "stream": True}) as reply:
            reply.raise_for_status()
            for number, _ in enumerate(reply.iter_lines()):
                if number >= 1:
                    break  # the connection closes with the request still generating: vLLM aborts it
        return None
    reply = requests.post(url, timeout=300, json={**body, "logprobs": 1, "return_tokens_as_token_ids": True})
    reply.raise_for_status()
    return [int(t.split(":", 1)[1]) for t in reply.json()["choices"][0]["logprobs"]["tokens"]]


def test_concurrent_requests_with_dropped_streams_match_the_output_without_kvoffload(tiny_model: str,
                                                                                      tmp_path) -> None:
    baseline = run_engine({"model": tiny_model, "prompts": PROMPTS, "rounds": 1})
    kept = [i for i in range(len(PROMPTS)) if i not in DROPPED]
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "KVOFFLOAD_LOCAL_DISK": str(tmp_path / "disk"), "KVOFFLOAD_MAX_LOCAL_DISK_SIZE": "0.003"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kvoffload.cli", "serve", tiny_model, "--cpu-size", "0.002",
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
             "--gpu-memory-utilization", "0.3", "--max-num-batched-tokens", "512", "--enforce-eager",
             "--no-enable-prefix-caching", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    ties = []
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(1)
        for attempt in range(PASSES):  # later passes load what earlier ones stored, from the pool or the disk
            with ThreadPoolExecutor(max_workers=16) as pool:
                outputs = list(pool.map(lambda i: _complete(port, i), range(len(PROMPTS))))
            result = compare([outputs[i] for i in kept], [baseline.rounds[0][i] for i in kept],
                             [baseline.margins[0][i] for i in kept])
            assert result.same, f"pass {attempt}: outputs differ from the no-kvoffload outputs: {result.mismatches}"
            ties += result.ties
        time.sleep(11)  # vLLM publishes connector stats at its log interval
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        (tmp_path / "metrics.txt").write_text(metrics)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps({"near_ties": ties}))
    log = log_path.read_text()
    assert "Traceback" not in log, log[-4000:]
    hits = [int(h) for h in re.findall(r"kvoffload hit tokens: (\d+)", log)]
    assert len(hits) >= len(kept) * PASSES and sum(hits) > 0
    assert re.search(r"kvoffload:evictions_total\S* [1-9]", metrics), "the pool never evicted: make it smaller"
    assert re.search(r"kvoffload:hit_tokens_total\S* [1-9]", metrics), "hit tokens missing from /metrics"
    assert re.search(r"kvoffload:disk_hits_total\S* [1-9]", metrics), "nothing was read back from the disk tier"
