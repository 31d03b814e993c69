"""Sliding-window + full-attention hybrids with vLLM's hybrid KV cache manager on, end to end on vllm-cpu.

kvoffload is ``SupportsHMA``: vLLM keeps its hybrid manager on, so a sliding-window layer keeps only its window
(``SlidingWindowManager`` frees the blocks that leave it) and the KV cache holds as many tokens as without the
connector. The tiny random-weight models of ``tests/tiny_archs.py`` have a window of 128 tokens; the prompts are
longer than the window and than ``max_num_batched_tokens`` (512), so every prompt is prefilled over several steps
while its sliding-window blocks are freed, and its second pass loads the full group's pages of every chunk and the
sliding group's pages of the last window only (the blocks vLLM allocates for the hit).

One engine per assertion group (module-scoped): the baseline (no connector), the connector with a disk tier (two
passes), a restarted engine on the same disk directory, and the negative control that zeroes the sliding group's
loaded pages. ``VLLM_CPU_KVCACHE_SPACE`` fixes the KV cache bytes, so the token capacities compare exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tests.conftest import EngineRun, run_engine  # noqa: E402
from tests.greedy import assert_same_greedy, differs_beyond_ties  # noqa: E402
from tests.tiny_archs import WINDOW, long_prompt, write_tiny_arch  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = [long_prompt(1), long_prompt(2), long_prompt(3, 700)]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: the same KV cache bytes in every engine
#: vllm-cpu 0.32 runs gemma3; gpt_oss is tried and skipped with vLLM's reason if this build cannot run it.
FAMILIES = ["gemma3", "gpt_oss"]


def capacity(run: EngineRun) -> int:
    """The KV cache size in tokens that vLLM logs at start."""
    found = re.findall(r"KV cache size: ([\d,]+) tokens", run.log)
    assert found, "vLLM logged no KV cache size"
    return int(found[-1].replace(",", ""))


def spec(model: str, **kw) -> dict:
    return {"model": model, "prompts": PROMPTS, "max_tokens": 12, **kw}


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_arch(tmp_path_factory.mktemp(request.param), request.param))


@pytest.fixture(scope="module")
def baseline(model: str) -> EngineRun:
    try:
        return run_engine(spec(model), env=ENV)
    except AssertionError as exc:  # the model itself does not run on this vLLM build: nothing to compare
        pytest.skip(f"{Path(model).name} does not run on this vLLM without kvoffload: {str(exc)[-400:]}")


@pytest.fixture(scope="module")
def disk_dir(model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hybrid-disk")


@pytest.fixture(scope="module")
def offloaded(model: str, baseline: EngineRun, disk_dir: Path) -> EngineRun:
    return run_engine(spec(model, rounds=2, connector="plugin",
                           extra_config={"max_local_cpu_size": 0.2, "local_disk": str(disk_dir),
                                         "max_local_disk_size": 1}), env=ENV)


@pytest.fixture(scope="module")
def restarted(model: str, offloaded: EngineRun, disk_dir: Path) -> EngineRun:
    return run_engine(spec(model, connector="plugin",
                           extra_config={"max_local_cpu_size": 0.2, "local_disk": str(disk_dir),
                                         "max_local_disk_size": 1}), env=ENV)


def test_hybrid_manager_stays_on_with_the_same_kv_capacity(baseline: EngineRun, offloaded: EngineRun) -> None:
    assert "turning off hybrid" not in offloaded.log.lower() and "disabling hybrid" not in offloaded.log.lower()
    assert re.search(r"KV cache groups offloaded: group 0: sliding window \d+.*group 1: full attention|"
                     r"group 0: full attention.*sliding window \d+", offloaded.log), offloaded.log[-3000:]
    assert capacity(offloaded) == capacity(baseline)


def test_outputs_identical_and_second_pass_hits(baseline: EngineRun, offloaded: EngineRun) -> None:
    assert_same_greedy(offloaded.rounds[0], baseline, what="first pass (stores) changed the output")
    assert_same_greedy(offloaded.rounds[1], baseline, what="second pass (loads) changed the output")
    hits = offloaded.hit_tokens()
    assert hits[:3] == [0, 0, 0]
    assert hits[3:] == [len(p.split()) - 1 for p in PROMPTS]  # all but the token vLLM computes
    assert "Loaded KV cache for" in offloaded.log
    # The sliding group stores the window at each chunk's end only: fewer bytes than the full group's pages.
    stored, loaded = offloaded.metrics["kvoffload:stored_bytes_total"], offloaded.metrics["kvoffload:loaded_bytes_total"]
    assert 0 < loaded < stored


def test_restart_hits_from_the_disk_tier(baseline: EngineRun, restarted: EngineRun) -> None:
    # Each prompt asks again until its chunks are prefetched from disk: the hits are logged in the order the
    # prefetches finish, not in prompt order (the fresh-clone CI run logged the 700-token prompt first).
    assert sorted(restarted.hit_tokens()) == sorted(len(p.split()) - 1 for p in PROMPTS)
    assert restarted.metrics.get("kvoffload:prefetched_chunks_total", 0) > 0
    assert restarted.metrics.get("vllm:prompt_tokens_cached_by_source{source=disk}", 0) > 0
    assert_same_greedy(restarted.rounds[0], baseline, what="loads from the disk tier after a restart changed the output")


def test_zeroing_the_sliding_window_pages_changes_outputs(model: str, baseline: EngineRun) -> None:
    """Negative control: the same hits, the sliding-window group's loaded pages zeroed, must give other tokens."""
    run = run_engine(spec(model, rounds=2, connector="tests.connectors", connector_name="ZeroSlidingLoadConnector",
                          extra_config={"max_local_cpu_size": 0.2}), env=ENV)
    assert max(run.hit_tokens()) > 2 * WINDOW
    assert_same_greedy(run.rounds[0], baseline, what="first pass (nothing loaded) changed the output")
    assert differs_beyond_ties(run.rounds[1], baseline)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sliding_window_hybrid_on_a_gpu_with_cuda_graphs(tmp_path: Path) -> None:
    """The same contract on CUDA with vLLM's default CUDA graphs (vLLM 0.26 on the H100): the hybrid manager
    stays on with the KV capacity of the engine without kvoffload, and each prompt's second pass hits and
    answers as without kvoffload. ``kv_cache_memory_bytes`` fixes the KV cache bytes of both engines."""
    model = str(write_tiny_arch(tmp_path / "gemma3", "gemma3"))
    engine = {"enforce_eager": False, "kv_cache_memory_bytes": 2**30}
    baseline = run_engine(spec(model, engine=engine))
    run = run_engine(spec(model, rounds=2, connector="plugin", engine=engine))
    assert "requires PIECEWISE CUDA graph mode" not in run.log
    assert capacity(run) == capacity(baseline)
    assert run.hit_tokens() == [0, 0, 0] + [len(p.split()) - 1 for p in PROMPTS]
    for outputs in run.rounds:
        assert_same_greedy(outputs, baseline)
