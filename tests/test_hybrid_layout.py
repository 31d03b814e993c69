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
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec  # noqa: E402

from kvoffload.config import load_settings  # noqa: E402
from kvoffload.vllm.identity import slot_layout  # noqa: E402

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
