"""Copy path: choose the fastest backend that works for this cache."""

from __future__ import annotations

import logging

import torch

from kvoffload.transfer.base import CopyBackend, DoneFence, Fence, PagedKV
from kvoffload.transfer.torch_copy import TorchCopyBackend

logger = logging.getLogger(__name__)

__all__ = ["CopyBackend", "DoneFence", "Fence", "PagedKV", "TorchCopyBackend", "make_copy_backend"]


def make_copy_backend(kv: PagedKV, pool: torch.Tensor, preference: str = "auto") -> CopyBackend:
    """``preference``: ``auto`` (CUDA extension when the cache is on a GPU and it loads), ``cuda`` or ``torch``."""
    if kv.device.type != "cuda" or preference == "torch":
        return TorchCopyBackend(kv, pool)
    try:
        from kvoffload.transfer.cuda import CudaCopyBackend
        return CudaCopyBackend(kv, pool)
    except Exception as exc:  # the extension is optional: any build or load failure means the torch path
        if preference == "cuda":
            raise RuntimeError(f"copy_backend is 'cuda' but the CUDA extension is unavailable: {exc}") from exc
        logger.warning("kvoffload: CUDA copy extension unavailable (%s); using the slower torch copy path", exc)
        return TorchCopyBackend(kv, pool)
