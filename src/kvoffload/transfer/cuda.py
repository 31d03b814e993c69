"""The CUDA copy path: gather/scatter kernels beside vLLM's cache, DMA between a device staging buffer and the pool.

Why this shape (measured on our H100, see ``field-and-physical-limits.md`` §3.3-3.4): one DMA per 32 KiB
page reaches only 5-10 GB/s, while a DMA of megabytes runs at line rate (~52 GB/s); an SM kernel that
reads or writes host memory over PCIe slows a concurrent prefill by 79-143 %, while DMA costs it ~0 %. So
the SMs only ever touch device memory (a few CTAs gather pages into staging, which is fast and short) and
PCIe is always crossed by the copy engines in large runs.

Each direction is a pipeline over *pieces* (windows of the copy list, up to 64 MiB of pages): a kernel stream
and a DMA stream hand pieces to each other through events, double-buffered in a staging ring, so the
kernel for piece *p+1* runs while piece *p* is on the wire. Stores and loads have separate pipelines so a
load on the critical path never queues behind a long store, and a load never holds up the compute stream
(vLLM runs a request only once its load is reported done). A step's store can also go layer by layer, each
layer's pieces issued once the forward wrote that layer (``layered_store``), so it crosses PCIe during the
forward rather than after it. The hazards between them are ordered
explicitly: per host slot (a store into a slot waits for earlier loads reading it; a load waits for the
store piece writing it, so a chunk stored a moment ago is loaded right behind its store, PCIe carrying
both directions at once) and per vLLM block (a load does not overwrite a block an earlier store has not
gathered yet, a store does not gather a block an earlier load has not written yet).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from kvoffload.errors import ExtensionUnavailable
from kvoffload.transfer.base import CopyBackend, DoneFence, Fence, LayeredStore, PagedKV

PIECE_BYTES = 64 << 20
"""Upper bound of one pipeline piece: a whole 256-token chunk of an 8B model (32-36 MiB) fits, so chunks
cross PCIe as one line-rate DMA each; the first piece's gather (the only one not hidden behind a DMA)
stays ~0.1 ms, and the staging ring stays at 2 x 64 MiB per direction."""

RING = 2
"""Staging buffers per direction: one being filled while the other is on the wire."""

MAX_CTAS = 32
"""CTAs of one gather/scatter launch. HBM-to-HBM copies at this width are still >5x faster than PCIe,
so the pipeline never waits for them, while most SMs stay free for the model's kernels."""

_CSRC = Path(__file__).resolve().parents[3] / "csrc"
_SOURCES = ("bindings.cpp", "kv_copy_kernels.cu")


@functools.cache
def extension() -> ModuleType:
    """The compiled kernels: the module ``pip install`` built, else a JIT build cached per source hash."""
    try:
        from kvoffload import _kvcopy  # type: ignore[attr-defined]  # built by setup.py when CUDA was present
        return _kvcopy
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise ExtensionUnavailable(f"torch {torch.__version__} is built without CUDA")
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise ExtensionUnavailable("no CUDA toolkit (nvcc) found; set CUDA_HOME to build the copy kernels")
    sources = [_CSRC / name for name in _SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise ExtensionUnavailable(f"kernel sources not found ({', '.join(missing)}); install with a CUDA "
                                   "torch and nvcc present to get a prebuilt extension")
    digest = hashlib.sha256(f"{sys.version_info[:2]}|{torch.__version__}|{torch.version.cuda}".encode())
    for source in sorted(p for p in _CSRC.iterdir() if p.is_file()):
        digest.update(source.name.encode() + source.read_bytes())
    build_dir = Path.home() / ".cache" / "kvoffload" / f"ext-{digest.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="kvoffload_kvcopy", sources=[str(s) for s in sources],
                              extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                              build_directory=str(build_dir), verbose=False)


@dataclass(frozen=True)
class CopyPlan:
    """A copy list split into pieces, each of which moves through one staging buffer in one go.

    ``entries`` ``(N, 3)``: per entry of the list, its vLLM block id, the byte offset of its layer-0 page in its
    piece's staging buffer and the byte pitch between its layers (what the kernels read). ``runs`` ``(R, 4)``:
    per run of consecutive pages of a slot inside a piece, its byte offset in the piece's buffer, slot, first
    page and number of pages; a run's staging bytes are ``(num_layers, pages, page_bytes)``, the order of the
    pool slot, so it crosses PCIe as one DMA. ``pieces`` ``(P, 4)``: first entry, entries, first run, runs.
    All int64 CPU tensors.
    """

    entries: torch.Tensor
    runs: torch.Tensor
    pieces: torch.Tensor


def plan_copy(block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor, num_layers: int,
              page_bytes: int, entries_per_piece: int) -> CopyPlan:
    """Split a copy list into pieces of ``entries_per_piece`` entries and give every entry its staging place.

    Vectorised: a load is planned between vLLM's scheduling and the first byte on the wire, and a Python loop
    over the ~2,500 pages of a few 10k-token prompts cost a millisecond there."""
    ids, slot, page = block_ids.numpy(), slots.numpy(), pages.numpy()
    n = len(ids)
    position = np.arange(n)
    piece = position // entries_per_piece
    starts = np.ones(n, dtype=bool)  # where a run begins: new slot, non-consecutive page or new piece
    starts[1:] = (slot[1:] != slot[:-1]) | (page[1:] != page[:-1] + 1) | (piece[1:] != piece[:-1])
    run_first = np.flatnonzero(starts)
    run_length = np.diff(np.append(run_first, n))
    run_piece = piece[run_first]
    run_bytes = num_layers * run_length * page_bytes
    before = np.cumsum(run_bytes) - run_bytes  # bytes of all earlier runs
    num_pieces = -(-n // entries_per_piece)
    piece_first_run = np.searchsorted(run_piece, np.arange(num_pieces))
    run_offset = before - before[piece_first_run][run_piece]  # bytes of the earlier runs of the same piece
    run_of = np.cumsum(starts) - 1
    entries = np.stack([ids, run_offset[run_of] + (position - run_first[run_of]) * page_bytes,
                        run_length[run_of] * page_bytes], axis=1)
    runs = np.stack([run_offset, slot[run_first], page[run_first], run_length], axis=1)
    piece_first = np.arange(num_pieces) * entries_per_piece
    pieces = np.stack([piece_first, np.minimum(entries_per_piece, n - piece_first), piece_first_run,
                       np.diff(np.append(piece_first_run, len(run_first)))], axis=1)
    return CopyPlan(torch.from_numpy(entries), torch.from_numpy(runs), torch.from_numpy(pieces))


def piece_entries(num_layers: int, page_bytes: int, pages_per_slot: int) -> int:
    """Entries per piece: ~``PIECE_BYTES`` of pages, whole slots when a slot fits so runs stay unsplit."""
    per = max(1, PIECE_BYTES // (num_layers * page_bytes))
    return per - per % pages_per_slot if per >= pages_per_slot else per


def vector_bytes(addresses: list[int], page_bytes: int) -> int:
    """Widest access (16, 8, 4, 2 or 1 bytes) that divides every page address the kernels compute."""
    common = math.gcd(page_bytes, *addresses)
    return min(16, common & -common)


class _EventsFence(Fence):
    """Done when every event is; timed from ``start`` (recorded where the copy could begin) to the last."""

    def __init__(self, events: list[torch.cuda.Event], start: torch.cuda.Event | None = None) -> None:
        self.events = events
        self.start = start

    def done(self) -> bool:
        return all(event.query() for event in self.events)

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()

    def seconds(self) -> float | None:
        if self.start is None:
            return None
        return max(self.start.elapsed_time(event) for event in self.events) / 1e3


class _BlockUse:
    """In-flight copies that touch vLLM blocks: (event recorded when the copy is done with them, blocks).

    A copy asks for the pending events of one set and adds itself to the other with the same block set,
    so callers build it once (``frozenset(block_ids.tolist())``)."""

    def __init__(self) -> None:
        self._uses: list[tuple[torch.cuda.Event, frozenset[int]]] = []

    def add(self, event: torch.cuda.Event, blocks: frozenset[int]) -> None:
        self._forget_finished()
        self._uses.append((event, blocks))

    def pending(self, blocks: frozenset[int]) -> list[torch.cuda.Event]:
        """Events of the unfinished copies that touch any of ``blocks``."""
        self._forget_finished()
        return [event for event, used in self._uses if not used.isdisjoint(blocks)]

    def _forget_finished(self) -> None:
        self._uses = [(event, blocks) for event, blocks in self._uses if not event.query()]


class _Pipeline:
    """One direction: a kernel stream, a DMA stream, and a ring of staging buffers they hand over.

    ``free[k]`` is recorded when the consumer of buffer *k* is done with it; the producer waits on it
    before refilling. ``ready`` is recorded by the producer and waited on by the consumer at once, so one
    event serves every piece (a stream wait binds to the record that precedes it).
    """

    def __init__(self, device: torch.device, buffer_bytes: int) -> None:
        self.device = device
        self.kernel = torch.cuda.Stream(device=device)
        self.dma = torch.cuda.Stream(device=device)
        self.ready = _created(self.dma)
        self.free = [_created(self.kernel) for _ in range(RING)]
        self.buffer_bytes = buffer_bytes
        self._staging: torch.Tensor | None = None
        self.next = 0  # the buffer the next piece takes

    def staging(self) -> torch.Tensor:
        """The ring's ``(RING, buffer_bytes)`` buffers (allocated on first use, then kept for the backend's life)."""
        if self._staging is None:
            self._staging = torch.empty((RING, self.buffer_bytes), dtype=torch.uint8, device=self.device)
        return self._staging

    def take(self) -> tuple[int, torch.Tensor]:
        index = self.next
        self.next = (index + 1) % RING
        return index, self.staging()[index]

    def close(self) -> None:
        self.kernel.synchronize()
        self.dma.synchronize()
        self._staging = None


class CudaCopyBackend(CopyBackend):
    name = "cuda"

    def __init__(self, kv: PagedKV, pool: torch.Tensor) -> None:
        super().__init__(kv, pool)
        if kv.device.type != "cuda" or any(layer.device != kv.device for layer in kv.layers):
            raise ValueError("CudaCopyBackend needs every KV layer on one CUDA device")
        if not pool.is_pinned() or not pool.is_contiguous():
            raise ValueError("CudaCopyBackend needs a contiguous pinned host pool (pageable copies block the CPU)")
        self._ext = extension()
        self.device = kv.device
        num_layers, self.pages_per_slot = kv.num_layers, pool.shape[2]
        bases = [layer.data_ptr() for layer in kv.layers]
        strides = [layer.stride(0) for layer in kv.layers]
        self._table = torch.tensor([bases, strides], dtype=torch.int64, device=self.device)
        self._vec = vector_bytes(bases + strides, kv.page_bytes)
        self._per_piece = piece_entries(num_layers, kv.page_bytes, self.pages_per_slot)
        piece_bytes = self._per_piece * num_layers * kv.page_bytes
        # a layer-wise load or store moves one layer of a step's requests per piece: up to PIECE_BYTES (~16k
        # tokens of 8B)
        self._per_layer_piece = piece_entries(1, kv.page_bytes, self.pages_per_slot)
        buffer_bytes = max(piece_bytes, self._per_layer_piece * kv.page_bytes)
        self._store = _Pipeline(self.device, buffer_bytes)
        self._load = _Pipeline(self.device, buffer_bytes)
        self._layer_done = [_created(self._load.kernel) for _ in range(num_layers)]  # re-recorded by each load
        compute = torch.cuda.current_stream(self.device)
        self._layer_written = [_created(compute) for _ in range(num_layers)]  # re-recorded by each layered store
        self._layer_events: list[torch.cuda.Event] = []  # per layer, of the step's layer-wise load
        self._stored_to: dict[int, torch.cuda.Event] = {}  # slot -> the store piece writing it
        self._loaded_from: dict[int, torch.cuda.Event] = {}  # slot -> last load reading it
        self._gathering = _BlockUse()  # stores that may not have read their blocks yet
        self._scattering = _BlockUse()  # loads that may not have written their blocks yet

    def store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        if len(block_ids) == 0:
            return DoneFence()
        self._check(block_ids, slots, pages)
        pipe = self._store
        num_layers = self.kv.num_layers
        with torch.cuda.device(self.device):
            pipe.kernel.wait_stream(torch.cuda.current_stream(self.device))
            blocks = frozenset(block_ids.tolist())
            for event in self._scattering.pending(blocks):
                pipe.kernel.wait_event(event)
            start = _recorded(pipe.kernel)
            plan, entries = self._plan(block_ids, slots, pages, num_layers, self._per_piece, pipe.kernel)
            for first, count, first_run, num_runs in plan.pieces.tolist():
                index, buffer = pipe.take()
                piece_slots = slots[first:first + count]
                pipe.kernel.wait_event(pipe.free[index])
                self._ext.copy_pages(self._table[0].data_ptr(), self._table[1].data_ptr(), num_layers,
                                     self.kv.page_bytes, entries.data_ptr(), first, count, buffer.data_ptr(), True,
                                     self._vec, MAX_CTAS, pipe.kernel.cuda_stream)
                pipe.ready.record(pipe.kernel)
                pipe.dma.wait_event(pipe.ready)
                for event in _pending(self._loaded_from, piece_slots):
                    pipe.dma.wait_event(event)
                self._ext.copy_runs(buffer.data_ptr(), self.pool.data_ptr(), plan.runs[first_run].data_ptr(), num_runs,
                                    num_layers, num_layers, self.pages_per_slot, self.kv.page_bytes, True,
                                    pipe.dma.cuda_stream)
                pipe.free[index].record(pipe.dma)
                # per piece (a piece is one chunk or less): a load of this chunk follows it on the wire
                # while later chunks of the same store are still being copied out
                _mark(self._stored_to, piece_slots, _recorded(pipe.dma))
            self._gathering.add(_recorded(pipe.kernel), blocks)
            return _EventsFence([_recorded(pipe.dma)], start)

    def layered_store(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> LayeredStore | None:
        if len(block_ids) == 0:
            return None
        self._check(block_ids, slots, pages)
        return _CudaLayeredStore(self, block_ids, slots, pages)

    def load(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> Fence:
        if len(block_ids) == 0:
            return DoneFence()
        self._check(block_ids, slots, pages)
        pipe = self._load
        with torch.cuda.device(self.device):
            # No wait for the compute stream: vLLM hands a request blocks that no queued step uses any more
            # (it defers frees past in-flight steps), and waiting would stall every queued load behind
            # each forward.
            blocks = frozenset(block_ids.tolist())
            start = self._begin_load(blocks)
            plan, entries = self._plan(block_ids, slots, pages, self.kv.num_layers, self._per_piece, pipe.kernel)
            for index, (first, count, _, _) in enumerate(plan.pieces.tolist()):
                piece_slots = slots[first:first + count]
                for event in _pending(self._stored_to, piece_slots):  # the stores writing this piece's slots
                    pipe.dma.wait_event(event)
                self._load_pieces(plan, entries, index, 1)
                _mark(self._loaded_from, piece_slots, _recorded(pipe.dma))
            return self._end_load(blocks, start)

    def load_sync(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor,
                  layerwise: bool) -> Fence:
        """Layer by layer (all of layer 0's pages, then layer 1's, ...), each layer's end an event that
        ``wait_layer`` puts in the compute stream's way: the forward's layer *l* runs as soon as layer *l*
        arrived, so the load hides behind the forward's own work (in eager mode mostly kernel launches).
        A layer of a request crosses PCIe as one batched DMA of its 1 MiB-ish runs."""
        if not layerwise or len(block_ids) == 0:
            return super().load_sync(block_ids, slots, pages, layerwise)
        self._check(block_ids, slots, pages)
        pipe = self._load
        with torch.cuda.device(self.device):
            blocks = frozenset(block_ids.tolist())
            start = self._begin_load(blocks)
            for event in _pending(self._stored_to, slots):  # every layer reads every slot
                pipe.dma.wait_event(event)
            plan, entries = self._plan(block_ids, slots, pages, 1, self._per_layer_piece, pipe.kernel)
            self._load_pieces(plan, entries, 0, len(plan.pieces), self._layer_done)
            self._layer_events = list(self._layer_done)
            _mark(self._loaded_from, slots, _recorded(pipe.dma))
            fence = self._end_load(blocks, start)
            self.wait_layer(0)  # written before the forward's first attention: see wait_layer
            return fence

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        with torch.cuda.device(self.device):
            compute = torch.cuda.current_stream(self.device)
            read, written = frozenset(src.tolist()), frozenset(dst.tolist())
            for event in self._scattering.pending(read | written) + self._gathering.pending(written):
                compute.wait_event(event)
            super().copy_blocks(src, dst)
            done = _recorded(compute)
            self._gathering.add(done, read)  # a later load into src (freed, reused) waits for this read
            self._scattering.add(done, written)

    def wait_layer(self, layer: int) -> None:
        if layer < len(self._layer_events):
            torch.cuda.current_stream(self.device).wait_event(self._layer_events[layer])

    def finish_layers(self) -> None:
        for event in self._layer_events:
            torch.cuda.current_stream(self.device).wait_event(event)
        self._layer_events = []

    def _begin_load(self, blocks: frozenset[int]) -> torch.cuda.Event:
        for event in self._gathering.pending(blocks):
            self._load.kernel.wait_event(event)
        return _recorded(self._load.dma)

    def _load_pieces(self, plan: CopyPlan, entries: torch.Tensor, first_piece: int, num_pieces: int,
                     layer_done: list[torch.cuda.Event] | None = None) -> None:
        """Issue pieces ``[first_piece, first_piece + num_pieces)`` of a load in one call (``kvo_load_pieces``
        in csrc/kv_copy.h): every layer of each piece, or, with ``layer_done``, layer by layer."""
        pipe = self._load
        pipe.next = self._ext.load_pieces(
            self._table[0].data_ptr(), self._table[1].data_ptr(), self.kv.num_layers, self.kv.page_bytes,
            entries.data_ptr(), self.pool.data_ptr(), self.pages_per_slot, plan.pieces[first_piece].data_ptr(),
            num_pieces, plan.runs.data_ptr(), [event.cuda_event for event in layer_done or ()],
            pipe.staging().data_ptr(), pipe.buffer_bytes, pipe.next, [event.cuda_event for event in pipe.free],
            pipe.ready.cuda_event, self._vec, MAX_CTAS, pipe.kernel.cuda_stream, pipe.dma.cuda_stream)

    def _end_load(self, blocks: frozenset[int], start: torch.cuda.Event) -> Fence:
        end = _recorded(self._load.kernel)
        self._scattering.add(end, blocks)
        return _EventsFence([end], start)

    def await_on_compute(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self._load.kernel)

    def fence(self) -> Fence:
        with torch.cuda.device(self.device):
            return _EventsFence([_recorded(self._store.dma), _recorded(self._load.kernel)])

    def close(self) -> None:
        self._store.close()
        self._load.close()

    def _check(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> None:
        """Reject what would make a kernel or DMA touch memory outside the cache or the pool."""
        for name, values, limit in (("block_ids", block_ids, self.kv.layers[0].shape[0]),
                                    ("slots", slots, self.pool.shape[0]), ("pages", pages, self.pages_per_slot)):
            if values.dtype != torch.int64 or values.device.type != "cpu" or values.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int64 CPU tensor")
            if len(values) != len(block_ids):
                raise ValueError("block_ids, slots and pages must have the same length")
            if int(values.min()) < 0 or int(values.max()) >= limit:
                raise IndexError(f"{name} out of range [0, {limit})")

    def _plan(self, block_ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor, num_layers: int,
              per_piece: int, stream: torch.cuda.Stream) -> tuple[CopyPlan, torch.Tensor]:
        """Plan the copy and upload its entry table on ``stream`` from pinned memory (never blocking)."""
        plan = plan_copy(block_ids, slots, pages, num_layers, self.kv.page_bytes, per_piece)
        with torch.cuda.stream(stream):
            return plan, plan.entries.pin_memory().to(self.device, non_blocking=True)


class _CudaLayeredStore(LayeredStore):
    """Each layer through the store ring as soon as the forward wrote it: the layer's gather waits on an event
    recorded on the compute stream when the forward reports the layer, then ``kvo_store_layer`` (csrc/kv_copy.h)
    moves every piece of that layer. The hazards of a whole store are ordered once, before the first layer: the
    gathers wait for loads still writing the blocks, the DMAs for loads still reading the slots. Loads of these
    slots are planned from the next step on, after ``finish`` marked the slots."""

    def __init__(self, backend: CudaCopyBackend, block_ids: torch.Tensor, slots: torch.Tensor,
                 pages: torch.Tensor) -> None:
        self.backend = backend
        self.slots = slots
        self.blocks = frozenset(block_ids.tolist())
        self.left = set(range(backend.kv.num_layers))
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # per layer: its copies, on the DMA stream
        pipe = backend._store
        with torch.cuda.device(backend.device):
            for event in backend._scattering.pending(self.blocks):
                pipe.kernel.wait_event(event)
            for event in _pending(backend._loaded_from, slots):
                pipe.dma.wait_event(event)
            self.plan, self.entries = backend._plan(block_ids, slots, pages, 1, backend._per_layer_piece, pipe.kernel)

    def layer(self, index: int) -> None:
        if index not in self.left:
            return
        self.left.discard(index)
        backend, pipe = self.backend, self.backend._store
        with torch.cuda.device(backend.device):
            written = backend._layer_written[index]
            written.record(torch.cuda.current_stream(backend.device))
            pipe.kernel.wait_event(written)
            pipe.dma.wait_event(written)  # so that the span times this layer's copies, not the forward before them
            begin = _recorded(pipe.dma)
            pipe.next = backend._ext.store_layer(
                backend._table[0].data_ptr(), backend._table[1].data_ptr(), backend.kv.num_layers,
                backend.kv.page_bytes, index, self.entries.data_ptr(), backend.pool.data_ptr(), backend.pages_per_slot,
                self.plan.pieces.data_ptr(), len(self.plan.pieces), self.plan.runs.data_ptr(),
                pipe.staging().data_ptr(), pipe.buffer_bytes, pipe.next, [event.cuda_event for event in pipe.free],
                pipe.ready.cuda_event, backend._vec, MAX_CTAS, pipe.kernel.cuda_stream, pipe.dma.cuda_stream)
            self.spans.append((begin, _recorded(pipe.dma)))

    def finish(self) -> Fence:
        for index in sorted(self.left):
            self.layer(index)
        backend = self.backend
        with torch.cuda.device(backend.device):
            _mark(backend._stored_to, self.slots, self.spans[-1][1])
            backend._gathering.add(_recorded(backend._store.kernel), self.blocks)
        return _SpansFence(self.spans)


class _SpansFence(Fence):
    """Done with the last span; timed as the sum of the spans (the copies, without the forward between them)."""

    def __init__(self, spans: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> None:
        self.spans = spans

    def done(self) -> bool:
        return self.spans[-1][1].query()

    def wait(self) -> None:
        self.spans[-1][1].synchronize()

    def seconds(self) -> float | None:
        return sum(begin.elapsed_time(end) for begin, end in self.spans) / 1e3


def _created(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event that exists on the device (torch creates one at its first record): the extension takes handles."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _pending(by_slot: dict[int, torch.cuda.Event], slots: torch.Tensor) -> list[torch.cuda.Event]:
    """The unfinished events of ``slots`` in ``by_slot``, each once; finished ones are forgotten."""
    pending: dict[int, torch.cuda.Event] = {}
    for slot in set(slots.tolist()):
        event = by_slot.get(slot)
        if event is None:
            continue
        if event.query():
            del by_slot[slot]
        else:
            pending[id(event)] = event
    return list(pending.values())


def _mark(by_slot: dict[int, torch.cuda.Event], slots: torch.Tensor, event: torch.cuda.Event) -> None:
    for slot in set(slots.tolist()):
        by_slot[slot] = event
