"""The copy path: moves whole KV pages between vLLM's paged cache and the host pool.

Vocabulary
----------
*page*: the bytes of one vLLM block of one layer (``kv_cache_spec.page_size_bytes``). Pages are copied
as raw bytes and never interpreted, so every layout vLLM hands a connector works the same way: per-layer
NHD/HND tensors (0.26), strided views into one shared buffer (0.32, layer- or block-outermost), MLA, any
dtype including fp8. The only requirement is that one block of one layer is contiguous.

*pool*: a host ``uint8`` tensor of shape ``(num_slots, num_layers, pages_per_slot, page_bytes)``, pinned
when the cache is on a GPU. A slot holds one chunk; within a slot each layer's pages are contiguous.

*copy list*: three equal-length int64 CPU tensors ``block_ids``, ``slots``, ``pages``; entry *i* maps the
vLLM block ``block_ids[i]`` (every layer of it) to page ``pages[i]`` of slot ``slots[i]``.

Ordering contract (every backend)
---------------------------------
* ``store`` reads the KV cache after all work already queued on the current compute stream, and returns
  without waiting for the copy.
* ``load`` returns without waiting either, and without holding up the compute stream: the loaded pages
  are in place once its fence is done. vLLM runs no forward on a request whose load the worker has not
  reported finished, so requests whose KV is on its way never stall the others' forwards.
* Copies issued later never overtake earlier ones that touch the same host slot or the same vLLM block:
  a store into a slot that an earlier load reads from waits for that load, a load from a slot an earlier
  store writes waits for it (chunk by chunk, so a chunk still being stored can be loaded right behind
  it), a store of blocks an earlier load writes waits for that load, and a load into blocks an earlier
  store still reads waits for the store.
* ``store`` and ``load`` return the :class:`Fence` of that copy; ``fence()`` one for everything issued so
  far. ``Fence.done()`` polls, ``Fence.wait()`` blocks. The host bytes of a stored slot are valid once its
  fence is done.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class Fence(ABC):
    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def wait(self) -> None: ...

    def seconds(self) -> float | None:
        """GPU time the fenced copy took (from when it could start to its end), once done; None if unknown."""
        return None


class DoneFence(Fence):
    """The fence of a synchronous backend: everything is finished when the call returns."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class LayeredStore(ABC):
    """A store issued layer by layer while the forward runs (``CopyBackend.layered_store``).

    The forward reports each layer once it has written that layer's KV (``layer``); ``finish`` after the
    forward stores whatever was not reported. A step's stores then cross PCIe beside its forward instead of
    after it, so a finished request's blocks, which vLLM keeps until its stores are done, are free again right
    after its last forward."""

    @abstractmethod
    def layer(self, index: int) -> None:
        """Store layer ``index`` of every entry, reading it after the work queued on the compute stream so far
        (the forward's write of that layer); a layer already stored is skipped."""

    @abstractmethod
    def finish(self) -> Fence:
        """Store the layers not stored yet (after everything queued on the compute stream); the whole store's
        fence."""


@dataclass(frozen=True)
class PagedKV:
    """vLLM's KV cache seen as pages: one ``(num_blocks, page_bytes)`` uint8 view per layer."""

    layers: tuple[torch.Tensor, ...]
    page_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device


class CopyBackend(ABC):
    """Moves pages between a :class:`PagedKV` and a host pool. One instance per worker."""

    name: str

    def __init__(self, kv: PagedKV, pool: torch.Tensor) -> None:
        if pool.dtype != torch.uint8 or pool.dim() != 4:
            raise ValueError("pool must be a uint8 tensor (num_slots, num_layers, pages_per_slot, page_bytes)")
        if pool.shape[1] != kv.num_layers or pool.shape[3] != kv.page_bytes:
            raise ValueError(f"pool shape {tuple(pool.shape)} does not match {kv.num_layers} layers "
                             f"of {kv.page_bytes}-byte pages")
        self.kv = kv
        self.pool = pool

    @abstractmethod
    def store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        """Copy every layer of ``block_ids[i]`` into ``pool[slots[i], :, pages[i]]``."""

    @abstractmethod
    def load(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        """Copy ``pool[slots[i], :, pages[i]]`` into every layer of ``block_ids[i]``."""

    def layered_store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> LayeredStore | None:
        """A :class:`LayeredStore` of the same copy list as ``store``, with the same ordering contract; None when
        this backend stores whole only (the caller then calls ``store`` after the forward)."""
        return None

    def load_sync(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor,
                  layerwise: bool) -> Fence:
        """A load the coming forward reads: work queued on the compute stream afterwards sees it.

        With ``layerwise``, a backend may instead order only layer 0 now and each later layer when the
        forward announces it (``wait_layer``, called before the attention of the layer *before* it, so the
        pages are in before the forward writes the new tokens' KV into the same blocks); ``finish_layers``
        after the forward orders whatever was not announced. This default loads everything up front.
        """
        if len(block_ids) == 0:  # nothing for the forward to wait for
            return DoneFence()
        fence = self.load(block_ids, slots, pages)
        self.await_on_compute()
        return fence

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer of vLLM block ``src[i]`` into block ``dst[i]``, on the cache's device, queued on the
        compute stream: the forward that follows reads ``dst`` complete, and copies issued later that write
        ``src`` or read ``dst`` come after it (``src``, ``dst``: equal-length 1-D int64 CPU tensors).

        It serves loads of chunks that are still in the blocks of a finished request (kept by vLLM until its
        stores are done): an on-device copy of gigabytes takes milliseconds, the host slot tens of them."""
        if len(src) != len(dst) or src.dtype != torch.int64 or dst.dtype != torch.int64:
            raise ValueError("src and dst must be int64 tensors of the same length")
        if len(src) == 0:
            return
        num_blocks = self.kv.layers[0].shape[0]
        if min(int(src.min()), int(dst.min())) < 0 or max(int(src.max()), int(dst.max())) >= num_blocks:
            raise IndexError(f"block ids out of range [0, {num_blocks})")
        src, dst = src.to(self.kv.device), dst.to(self.kv.device)
        for layer in self.kv.layers:
            words = _as_words(layer)
            words.index_copy_(0, dst, words.index_select(0, src))

    def await_on_compute(self) -> None:
        """Make the compute stream wait for every load issued so far (nothing to do for synchronous copies)."""

    def wait_layer(self, layer: int) -> None:
        """Order the compute stream after layer ``layer`` of the step's layer-wise load (if there is one)."""

    def finish_layers(self) -> None:
        """Order the compute stream after every layer of the step's layer-wise load, and forget it."""

    @abstractmethod
    def fence(self) -> Fence:
        """A handle on every copy issued so far."""

    def close(self) -> None:
        """Release streams and buffers."""


def _as_words(pages: torch.Tensor) -> torch.Tensor:
    """``pages`` (a ``(num_blocks, page_bytes)`` uint8 view) as the widest integers that tile every page:
    torch's indexing kernels move one element per thread, so 8-byte words copy several times faster."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if pages.shape[1] % size == 0 and pages.stride(0) % size == 0 and pages.storage_offset() % size == 0:
            return pages.view(dtype)
    return pages
