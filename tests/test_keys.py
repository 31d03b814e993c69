"""Chunk keys: deterministic across processes, namespaced by model, salt and adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvoffload.keys import ModelFingerprint, chunk_keys, request_namespace

MODEL = ModelFingerprint(model="Qwen/Qwen3-8B", revision=None, kv_dtype="torch.bfloat16", num_layers=36,
                         num_kv_heads=8, head_size=128, block_size=16, page_bytes=65536, tp_size=1)
TOKENS = list(range(1000, 1700))

SNIPPET = """
import json
from kvoffload.keys import ModelFingerprint, chunk_keys, request_namespace
m = ModelFingerprint(model="Qwen/Qwen3-8B", revision=None, kv_dtype="torch.bfloat16", num_layers=36,
                     num_kv_heads=8, head_size=128, block_size=16, page_bytes=65536, tp_size=1)
print(json.dumps([k.hex() for k in chunk_keys(request_namespace(m), list(range(1000, 1700)), 256)]))
"""


def test_keys_equal_across_processes_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("1", "987654"):
        proc = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.append(json.loads(proc.stdout))
    here = [k.hex() for k in chunk_keys(request_namespace(MODEL), TOKENS, 256)]
    assert outputs[0] == outputs[1] == here
    assert len(here) == 3  # two whole chunks and the partial tail


def test_chain_prefix_property_and_partial_tail() -> None:
    ns = request_namespace(MODEL)
    longer = chunk_keys(ns, TOKENS + [5, 6, 7], 256)
    shorter = chunk_keys(ns, TOKENS, 256)
    assert longer[:2] == shorter[:2]  # same whole chunks, same keys
    assert longer[2] != shorter[2]  # tails of different length never collide
    changed = chunk_keys(ns, [9] + TOKENS[1:], 256)
    assert all(a != b for a, b in zip(changed, shorter))  # a change in chunk 0 changes every later key
    assert chunk_keys(ns, TOKENS, 256, include_partial=False) == shorter[:2]
    resumed = chunk_keys(ns, TOKENS[256:], 256, start_key=shorter[0])
    assert resumed == shorter[1:]


def test_namespace_separates_models_salts_and_adapters() -> None:
    other_model = ModelFingerprint(**{**MODEL.__dict__, "kv_dtype": "torch.float8_e4m3fn"})
    namespaces = {
        request_namespace(MODEL), request_namespace(other_model), request_namespace(MODEL, cache_salt="tenant-a"),
        request_namespace(MODEL, adapter="adapter-1"),
        request_namespace(ModelFingerprint(**{**MODEL.__dict__, "tp_size": 2})),
        request_namespace(ModelFingerprint(**{**MODEL.__dict__, "block_size": 32})),
        request_namespace(ModelFingerprint(**{**MODEL.__dict__, "weights": "other weights, same path"})),
        request_namespace(ModelFingerprint(**{**MODEL.__dict__, "config": "rope_theta overridden"})),
    }
    assert len(namespaces) == 8
    assert len({chunk_keys(ns, TOKENS, 256)[0] for ns in namespaces}) == 8
