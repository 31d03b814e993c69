"""Under load through the OpenAI server: 32 concurrent requests, shared prefixes, a pool that evicts.

The server is started with ``kvoffload serve`` (so the CLI path is tested too) on 127.0.0.1 and every
completion must equal what the same prompt gives without kvoffload.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.vllm

FAMILIES = [" ".join(str(f * 1000 + i) for i in range(700)) for f in range(4)]
PROMPTS = [f"{FAMILIES[i % 4]} {' '.join(['kv', 'cache', 'offload', 'token'][: 1 + i % 4])} {i}" for i in range(32)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(port: int, prompt: str) -> str:
    reply = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def test_32_concurrent_requests_match_the_output_without_kvoffload(tiny_model: str, tmp_path) -> None:
    expected = run_engine({"model": tiny_model, "prompts": PROMPTS, "rounds": 1}).texts[0]
    port = _free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kvoffload.cli", "serve", tiny_model, "--cpu-size", "0.002",
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
             "--gpu-memory-utilization", "0.3", "--max-num-batched-tokens", "512", "--enforce-eager",
             "--no-enable-prefix-caching", "--seed", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
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
        for attempt in range(2):  # the second pass loads what the first stored, where the pool still has it
            with ThreadPoolExecutor(max_workers=32) as pool:
                texts = list(pool.map(lambda p: _complete(port, p), PROMPTS))
            assert texts == expected, f"pass {attempt}: outputs differ from the no-kvoffload outputs"
        time.sleep(11)  # vLLM publishes connector stats at its log interval
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        (tmp_path / "metrics.txt").write_text(metrics)
    finally:
        server.terminate()
        server.wait(timeout=60)
    log = log_path.read_text()
    hits = [int(h) for h in re.findall(r"kvoffload hit tokens: (\d+)", log)]
    assert len(hits) >= 64 and sum(hits) > 0
    assert re.search(r"kvoffload:evictions_total\S* [1-9]", metrics), "the pool never evicted: make it smaller"
    assert re.search(r"kvoffload:hit_tokens_total\S* [1-9]", metrics), "hit tokens missing from /metrics"
