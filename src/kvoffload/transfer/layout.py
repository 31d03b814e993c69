"""See any layer tensor vLLM registers as ``(num_blocks, page_bytes)`` raw bytes.

vLLM 0.26 gives one tensor per layer, logically ``[blocks, heads, tokens, 2*head]`` with NHD or HND
strides; 0.32 gives strided views into one buffer shared by all layers (layer- or block-outermost); MLA
gives ``[blocks, tokens, latent]``. In every case the bytes of one block of one layer are contiguous and
block *b* starts at ``data_ptr + b * stride(0)``, which is all the copy path needs. When the attention
kernel splits a manager block into several kernel blocks, dim 0 counts kernel blocks and a manager block
is ``split`` consecutive kernel pages.
"""

from __future__ import annotations

import math

import torch

from kvoffload.errors import UnsupportedLayout
from kvoffload.transfer.base import PagedKV


def _dense_inner(tensor: torch.Tensor) -> bool:
    """True when dims 1.. of ``tensor`` cover one contiguous run of memory (any order)."""
    dims = sorted((tensor.stride(d), tensor.size(d)) for d in range(1, tensor.dim()) if tensor.size(d) > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def page_view(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """A ``(num_blocks, page_bytes)`` uint8 view of one layer's cache; ``num_blocks`` = manager blocks."""
    if tensor.dim() < 2:
        raise UnsupportedLayout(f"a KV cache tensor needs a block dimension, got shape {tuple(tensor.shape)}")
    kernel_blocks = tensor.size(0)
    if kernel_blocks % num_blocks:
        raise UnsupportedLayout(f"{kernel_blocks} kernel blocks do not split into {num_blocks} vLLM blocks")
    split = kernel_blocks // num_blocks
    elem = tensor.element_size()
    kernel_page = math.prod(tensor.shape[1:]) * elem
    if not _dense_inner(tensor):
        raise UnsupportedLayout(f"one block of the KV cache is not contiguous (shape {tuple(tensor.shape)}, "
                                f"strides {tensor.stride()})")
    block_stride = tensor.stride(0) * elem
    if split > 1 and block_stride != kernel_page:
        raise UnsupportedLayout("kernel blocks of one vLLM block are not adjacent in memory")
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    raw.set_(tensor.untyped_storage())
    return torch.as_strided(raw, (num_blocks, kernel_page * split), (block_stride * split, 1),
                            tensor.storage_offset() * elem)


def paged_kv(tensors: list[torch.Tensor], num_blocks: int) -> PagedKV:
    """The :class:`PagedKV` of a model's layer tensors, in layer order."""
    views = tuple(page_view(t, num_blocks) for t in tensors)
    sizes = {v.shape[1] for v in views}
    if len(sizes) != 1:
        raise UnsupportedLayout(f"layers have different page sizes {sorted(sizes)}; kvoffload needs one page size")
    return PagedKV(layers=views, page_bytes=sizes.pop())
