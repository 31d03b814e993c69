"""The copy path is byte-exact for every KV layout vLLM hands a connector.

Every check compares against an independent reference: pages are read by plain indexing of the
*physical* buffer each layout is built from, never through ``layout.py``'s strided views. Data is random
bytes (never zeros) and the untouched destination is poisoned with 0xAB, so a copy that writes the wrong
place, writes too much, or does nothing is caught. CPU tests run everywhere; ``gpu`` tests run the same
matrix through both backends on CUDA, plus the stream-ordering races that only exist there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kvoffload.transfer import TorchCopyBackend, make_copy_backend
from kvoffload.transfer import cuda as cuda_copy
from kvoffload.transfer.base import CopyBackend, PagedKV
from kvoffload.transfer.cuda import PIECE_BYTES, plan_copy, piece_entries, vector_bytes
from kvoffload.transfer.layout import paged_kv

POISON = 0xAB
LAYERS, BLOCKS, HEADS, TOKENS, HEAD = 3, 12, 2, 4, 8
SLOTS, PAGES_PER_SLOT = 5, 4
LAYOUTS = ["nhd", "hnd", "lbnhc", "lbhnc", "blnhc", "blhnc", "mla", "split"]
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]

# (block_ids, slots, pages): non-contiguous unsorted ids; slots out of order; a partial last chunk; a
# chunk starting at a page offset; a single page.
COPY_LISTS = {
    "full": ([7, 2, 11, 4, 0, 9, 5, 3], [2] * 4 + [0] * 4, [0, 1, 2, 3] * 2),
    "partial": ([10, 1, 6, 8, 3, 5], [3] * 4 + [1] * 2, [0, 1, 2, 3, 0, 1]),
    "offset": ([4, 9, 2], [4, 4, 4], [1, 2, 3]),
    "single": ([6], [1], [2]),
}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_bytes(*shape: int, device: str | torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bytes in 1..255 (never 0, never the poison would be too likely to hide a miss)."""
    return torch.randint(1, 256, shape, dtype=torch.uint8, generator=generator).to(device)


@dataclass
class Cache:
    """A KV cache as vLLM would register it, plus an independent way to read its pages."""

    tensors: list[torch.Tensor]  # what register_kv_caches receives, in layer order
    raws: list[torch.Tensor]  # the uint8 physical buffers the tensors view
    num_blocks: int
    page: Callable[[int, int], torch.Tensor]  # (layer, block) -> the block's bytes, by physical indexing

    def kv(self) -> PagedKV:
        return paged_kv(self.tensors, self.num_blocks)

    def poison(self) -> None:
        for raw in self.raws:
            raw.fill_(POISON)

    def snapshot(self) -> dict[tuple[int, int], torch.Tensor]:
        return {(layer, block): self.page(layer, block).clone()
                for layer in range(len(self.tensors)) for block in range(self.num_blocks)}


def make_cache(layout: str, dtype: torch.dtype, device: str | torch.device, layers: int = LAYERS,
               blocks: int = BLOCKS, heads: int = HEADS, tokens: int = TOKENS, head: int = HEAD) -> Cache:
    """Build ``layout`` the way vLLM does: a raw byte buffer viewed as ``dtype`` then permuted/sliced."""
    elem = torch.empty(0, dtype=dtype).element_size()
    content = 2 * head * elem  # bytes of K and V of one token of one head

    def view(raw: torch.Tensor) -> torch.Tensor:
        return raw.view(dtype)

    if layout in ("nhd", "hnd"):  # 0.26: one tensor per layer, logical [B, H, N, 2D]
        shape = (blocks, tokens, heads, content) if layout == "nhd" else (blocks, heads, tokens, content)
        raws = [random_bytes(*shape, device=device) for _ in range(layers)]
        tensors = [view(r).permute(0, 2, 1, 3) if layout == "nhd" else view(r) for r in raws]
        return Cache(tensors, raws, blocks, lambda l, b: raws[l][b].reshape(-1))
    if layout in ("lbnhc", "lbhnc", "blnhc", "blhnc"):  # 0.32: strided views into one shared buffer
        inner = (tokens, heads, content) if layout[2:4] == "nh" else (heads, tokens, content)
        outer = (layers, blocks) if layout.startswith("lb") else (blocks, layers)
        raw = random_bytes(*outer, *inner, device=device)
        typed = view(raw)
        parts = [typed[l] if layout.startswith("lb") else typed[:, l] for l in range(layers)]
        tensors = [p.permute(0, 2, 1, 3) if layout[2:4] == "nh" else p for p in parts]

        def page(l: int, b: int) -> torch.Tensor:
            return (raw[l, b] if layout.startswith("lb") else raw[b, l]).reshape(-1)
        return Cache(tensors, [raw], blocks, page)
    if layout == "mla":  # [B, N, latent], one latent vector per token
        raws = [random_bytes(blocks, tokens, 9 * head * elem, device=device) for _ in range(layers)]
        return Cache([view(r) for r in raws], raws, blocks, lambda l, b: raws[l][b].reshape(-1))
    if layout == "split":  # kernel blocks of half the tokens: dim 0 counts 2 x blocks
        raws = [random_bytes(2 * blocks, heads, tokens // 2, content, device=device) for _ in range(layers)]
        return Cache([view(r) for r in raws], raws, blocks, lambda l, b: raws[l][2 * b:2 * b + 2].reshape(-1))
    raise ValueError(layout)


def make_pool(kv: PagedKV, slots: int = SLOTS, pages_per_slot: int = PAGES_PER_SLOT, fill: str = "poison") -> torch.Tensor:
    shape = (slots, kv.num_layers, pages_per_slot, kv.page_bytes)
    pinned = kv.device.type == "cuda"
    pool = torch.empty(shape, dtype=torch.uint8, pin_memory=pinned)
    pool.copy_(random_bytes(*shape, device="cpu") if fill == "random" else torch.full(shape, POISON, dtype=torch.uint8))
    return pool


def copy_list(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(values, dtype=torch.int64) for values in COPY_LISTS[name])  # type: ignore[return-value]


def expected_pool_after_store(cache: Cache, before: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor,
                              pages: torch.Tensor) -> torch.Tensor:
    expected = before.clone()
    for block, slot, page in zip(ids.tolist(), slots.tolist(), pages.tolist()):
        for layer in range(expected.shape[1]):
            expected[slot, layer, page] = cache.page(layer, block).cpu()
    return expected


def check_cache_after_load(cache: Cache, before: dict[tuple[int, int], torch.Tensor], pool: torch.Tensor,
                           ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor) -> None:
    source = {block: (slot, page) for block, slot, page in zip(ids.tolist(), slots.tolist(), pages.tolist())}
    for (layer, block), old in before.items():
        got = cache.page(layer, block).cpu()
        want = pool[source[block][0], layer, source[block][1]] if block in source else old.cpu()
        assert torch.equal(got, want), f"layer {layer} block {block} ({'loaded' if block in source else 'untouched'})"


def roundtrip(make_backend: Callable[[PagedKV, torch.Tensor], CopyBackend], layout: str, dtype: torch.dtype,
              device: str, list_name: str) -> None:
    """Store into a poisoned pool, check it; load from a random pool into a poisoned cache, check it."""
    cache = make_cache(layout, dtype, device)
    kv = cache.kv()
    ids, slots, pages = copy_list(list_name)

    pool = make_pool(kv)
    before = pool.clone()
    backend = make_backend(kv, pool)
    backend.store(ids, slots, pages)
    backend.fence().wait()
    assert torch.equal(pool, expected_pool_after_store(cache, before, ids, slots, pages))
    backend.close()

    pool = make_pool(kv, fill="random")
    cache.poison()
    snapshot = cache.snapshot()
    backend = make_backend(kv, pool)
    backend.load(ids, slots, pages).wait()
    check_cache_after_load(cache, snapshot, pool, ids, slots, pages)
    backend.close()


@pytest.mark.parametrize("list_name", list(COPY_LISTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_backend_cpu(layout: str, dtype: torch.dtype, list_name: str) -> None:
    roundtrip(TorchCopyBackend, layout, dtype, "cpu", list_name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks_cpu(layout: str) -> None:
    """Every layer of each source block lands in its destination; nothing else changes; bad ids are refused."""
    cache = make_cache(layout, torch.bfloat16, "cpu")
    kv = cache.kv()
    copier = TorchCopyBackend(kv, make_pool(kv))
    src, dst = torch.tensor([7, 2, 11]), torch.tensor([0, 9, 5])
    before = cache.snapshot()
    copier.copy_blocks(src, dst)
    moved = dict(zip(dst.tolist(), src.tolist()))
    for (layer, block), old in before.items():
        want = before[(layer, moved[block])] if block in moved else old
        assert torch.equal(cache.page(layer, block), want), f"layer {layer} block {block}"
    with pytest.raises(IndexError, match="out of range"):
        copier.copy_blocks(torch.tensor([BLOCKS]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same length"):
        copier.copy_blocks(torch.tensor([1, 2]), torch.tensor([0]))


def test_factory_on_cpu_uses_torch() -> None:
    kv = make_cache("lbhnc", torch.bfloat16, "cpu").kv()
    assert isinstance(make_copy_backend(kv, make_pool(kv)), TorchCopyBackend)


# --- the CUDA backend's plan, executed by an emulator of the kernel and DMA semantics (runs on CPU) ---

def emulate_cuda_path(kv: PagedKV, pool: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor,
                      per_piece: int, store: bool) -> None:
    """Do what ``kvo_copy_pages`` and ``kvo_copy_runs`` do (see csrc/kv_copy.h), one piece at a time."""
    layers, page_bytes = kv.num_layers, kv.page_bytes
    plan = plan_copy(ids, slots, pages, layers, page_bytes, per_piece)
    assert plan.entries.shape == (len(ids), 3)
    assert plan.pieces[:, 1].sum() == len(ids) and plan.pieces[:, 3].sum() == len(plan.runs)
    staging = torch.full((per_piece * layers * page_bytes,), POISON, dtype=torch.uint8)
    for first, count, first_run, num_runs in plan.pieces.tolist():
        region = [(int(b), int(off) + l * int(pitch), l)
                  for b, off, pitch in plan.entries[first:first + count].tolist() for l in range(layers)]
        assert all(0 <= at and at + page_bytes <= len(staging) for _, at, _ in region)
        if store:  # gather kernel
            for block, at, layer in region:
                staging[at:at + page_bytes] = kv.layers[layer][block]
        for offset, slot, first_page, length in plan.runs[first_run:first_run + num_runs].tolist():  # a DMA each
            assert offset + layers * length * page_bytes <= len(staging)
            dev = staging[offset:offset + layers * length * page_bytes].view(layers, length, page_bytes)
            if store:
                pool[slot, :, first_page:first_page + length] = dev
            else:
                dev.copy_(pool[slot, :, first_page:first_page + length])
        if not store:  # scatter kernel
            for block, at, layer in region:
                kv.layers[layer][block] = staging[at:at + page_bytes]


@pytest.mark.parametrize("per_piece", [1, 3, PAGES_PER_SLOT, 100])
@pytest.mark.parametrize("list_name", list(COPY_LISTS))
@pytest.mark.parametrize("layout", ["nhd", "blnhc", "split"])
def test_cuda_plan_emulated(layout: str, list_name: str, per_piece: int) -> None:
    cache = make_cache(layout, torch.bfloat16, "cpu")
    kv = cache.kv()
    ids, slots, pages = copy_list(list_name)
    pool = make_pool(kv)
    before = pool.clone()
    emulate_cuda_path(kv, pool, ids, slots, pages, per_piece, store=True)
    assert torch.equal(pool, expected_pool_after_store(cache, before, ids, slots, pages))

    pool = make_pool(kv, fill="random")
    cache.poison()
    snapshot = cache.snapshot()
    emulate_cuda_path(kv, pool, ids, slots, pages, per_piece, store=False)
    check_cache_after_load(cache, snapshot, pool, ids, slots, pages)


def emulate_store_layer(kv: PagedKV, pool: torch.Tensor, plan: cuda_copy.CopyPlan, layer: int) -> None:
    """Do what ``kvo_store_layer`` does with a one-layer plan: per piece, gather the layer, DMA its runs."""
    page_bytes = kv.page_bytes
    for first, count, first_run, num_runs in plan.pieces.tolist():
        staging = torch.full((int(plan.entries[first:first + count, 1].max()) + page_bytes,), POISON, dtype=torch.uint8)
        for block, offset, _ in plan.entries[first:first + count].tolist():  # one layer: the pitch is unused
            staging[offset:offset + page_bytes] = kv.layers[layer][block]
        for offset, slot, first_page, length in plan.runs[first_run:first_run + num_runs].tolist():
            pool[slot, layer, first_page:first_page + length] = staging[offset:offset + length * page_bytes].view(
                length, page_bytes)


@pytest.mark.parametrize("per_piece", [1, 3, PAGES_PER_SLOT, 100])
@pytest.mark.parametrize("list_name", list(COPY_LISTS))
def test_layered_store_plan_emulated(list_name: str, per_piece: int) -> None:
    """The one-layer plan a layered store passes to ``kvo_store_layer``, layer after layer in any order, fills
    the pool exactly as a whole store."""
    cache = make_cache("blnhc", torch.bfloat16, "cpu")
    kv = cache.kv()
    ids, slots, pages = copy_list(list_name)
    pool = make_pool(kv)
    before = pool.clone()
    plan = plan_copy(ids, slots, pages, 1, kv.page_bytes, per_piece)
    for layer in (2, 0, 1):
        emulate_store_layer(kv, pool, plan, layer)
    assert torch.equal(pool, expected_pool_after_store(cache, before, ids, slots, pages))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layered_store_cpu(layout: str) -> None:
    """On a CPU cache each reported layer is copied at once (what the forward writes into it later is not),
    and ``finish`` copies the layers never reported."""
    cache = make_cache(layout, torch.bfloat16, "cpu")
    kv = cache.kv()
    ids, slots, pages = copy_list("partial")
    pool = make_pool(kv)
    before = pool.clone()
    store = TorchCopyBackend(kv, pool).layered_store(ids, slots, pages)
    assert store is not None
    store.layer(1)
    expected = expected_pool_after_store(cache, before, ids, slots, pages)
    kv.layers[1].fill_(0)  # written after its report: not what was stored
    store.layer(1)  # reported twice: stored once
    store.finish().wait()
    assert torch.equal(pool, expected)


def test_whole_slot_runs_stay_whole() -> None:
    """Chunk-aligned lists must cross PCIe as one DMA per slot (the fast, 1-D case in kvo_copy_runs)."""
    ids = torch.randperm(64)[:32]
    slots = torch.arange(2).repeat_interleave(16)
    plan = plan_copy(ids, slots, torch.arange(16).repeat(2), 36, 32768, piece_entries(36, 32768, 16))
    assert plan.runs[:, 3].tolist() == [16, 16]
    assert piece_entries(36, 32768, 16) * 36 * 32768 <= PIECE_BYTES
    assert piece_entries(36, 65536, 16) == 16  # Qwen3-8B: one 36 MiB chunk per piece
    assert piece_entries(80, 65536, 16) == 12  # a slot larger than a piece: runs split, pieces stay bounded


def test_vector_width() -> None:
    assert vector_bytes([1 << 20, 4096], 32768) == 16
    assert vector_bytes([1 << 20, 4104], 32768) == 8
    assert vector_bytes([1 << 20 | 2, 4096], 32768) == 2
    assert vector_bytes([1 << 20], 1155) == 1


# --- GPU: both backends on CUDA, and the races between streams ---

def cuda_backend(kv: PagedKV, pool: torch.Tensor) -> CopyBackend:
    from kvoffload.transfer.cuda import CudaCopyBackend
    return CudaCopyBackend(kv, pool)


BACKENDS = {"torch": TorchCopyBackend, "cuda": cuda_backend}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("list_name", list(COPY_LISTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_cuda(backend: str, layout: str, dtype: torch.dtype, list_name: str) -> None:
    roundtrip(BACKENDS[backend], layout, dtype, "cuda", list_name)


@pytest.mark.gpu
@gpu
def test_factory_on_cuda_uses_extension() -> None:
    kv = make_cache("lbnhc", torch.bfloat16, "cuda").kv()
    assert make_copy_backend(kv, make_pool(kv), preference="cuda").name == "cuda"


@pytest.mark.gpu
@gpu
def test_unaligned_pages_cuda() -> None:
    """Page sizes that are not multiples of 16 bytes take the narrower-vector kernels and stay exact."""
    caches = [make_cache("hnd", torch.float8_e4m3fn, "cuda", tokens=3, head=3),  # 36-byte pages: 4-byte vectors
              make_cache("mla", torch.float8_e4m3fn, "cuda", tokens=3, head=1)]  # 27-byte pages: bytes
    for cache, width in zip(caches, (4, 1)):
        kv = cache.kv()
        assert vector_bytes([t.data_ptr() for t in kv.layers] + [t.stride(0) for t in kv.layers], kv.page_bytes) == width
        for backend in BACKENDS.values():
            ids, slots, pages = copy_list("partial")
            pool = make_pool(kv)
            before = pool.clone()
            copier = backend(kv, pool)
            copier.store(ids, slots, pages)
            copier.fence().wait()
            assert torch.equal(pool, expected_pool_after_store(cache, before, ids, slots, pages))
            cache_snapshot = cache.snapshot()
            pool = make_pool(kv, fill="random")
            copier = backend(kv, pool)
            copier.load(ids, slots, pages).wait()
            check_cache_after_load(cache, cache_snapshot, pool, ids, slots, pages)


def big_cache() -> tuple[Cache, PagedKV]:
    """Large enough (8 layers x 64 KiB pages) that copies take long and unordered ones would overlap."""
    cache = make_cache("lbnhc", torch.bfloat16, "cuda", layers=8, blocks=128, heads=8, tokens=16, head=128)
    return cache, cache.kv()


def layer_pages(cache: Cache, blocks: list[int]) -> torch.Tensor:
    """(layers, len(blocks), page_bytes) bytes of ``blocks``, read on the current stream."""
    return torch.stack([torch.stack([cache.page(l, b) for b in blocks]) for l in range(len(cache.tensors))])


def chunk(blocks: list[int], slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor(blocks), torch.full((len(blocks),), slot, dtype=torch.int64), torch.arange(len(blocks)))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_store_reads_after_compute_while_loads_run(backend: str) -> None:
    """Store fresh chunks into slots 0-3 while loading slot 7 into other blocks, again and again.

    Each chunk is written on the compute stream behind a long sleep just before its store, so a store
    that does not wait for compute would copy stale bytes; the loads run concurrently on their own
    streams. Every round uses its own blocks: the contract does not order later compute writes after a store.
    """
    cache, kv = big_cache()
    pool = make_pool(kv, slots=8, pages_per_slot=16, fill="random")
    copier = BACKENDS[backend](kv, pool)
    loaded_blocks = list(range(40, 56))
    expected = {}
    for i in range(4):  # nothing in this loop may synchronize with the compute stream
        first = 64 + 16 * i
        torch.cuda._sleep(20_000_000)
        for layer in kv.layers:
            layer[first:first + 16] = torch.randint(1, 256, (16, kv.page_bytes), dtype=torch.uint8, device="cuda")
        expected[i] = layer_pages(cache, list(range(first, first + 16)))
        copier.store(*chunk(list(range(first, first + 16)), i))
        copier.load(*chunk(loaded_blocks, 7))
    copier.fence().wait()
    for i, pages in expected.items():
        assert torch.equal(pool[i], pages.cpu()), f"slot {i}"
    assert torch.equal(layer_pages(cache, loaded_blocks).cpu(), pool[7])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_same_slot_ordering(backend: str) -> None:
    """store-after-load and load-after-store on one slot, and a load into blocks a store is still reading."""
    cache, kv = big_cache()
    pool = make_pool(kv, slots=4, pages_per_slot=16, fill="random")
    copier = BACKENDS[backend](kv, pool)
    a, b, c = list(range(0, 16)), list(range(16, 32)), list(range(60, 76))
    old_slot0 = pool[0].clone()
    pages_a = layer_pages(cache, a).cpu()

    copier.load(*chunk(b, 0))  # reads slot 0 ...
    copier.store(*chunk(a, 0))  # ... which this store then overwrites
    copier.load(*chunk(c, 0))  # must see the store, not the old slot
    copier.store(*chunk(c, 1))  # reads c after that load wrote it
    copier.load(*chunk(a, 2))  # overwrites a, which the store into slot 0 may still be reading
    copier.fence().wait()
    torch.cuda.synchronize()

    assert torch.equal(layer_pages(cache, b).cpu(), old_slot0)
    assert torch.equal(pool[0], pages_a)
    assert torch.equal(layer_pages(cache, c).cpu(), pages_a)
    assert torch.equal(pool[1], pages_a)
    assert torch.equal(layer_pages(cache, a).cpu(), pool[2])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_loads_follow_a_long_store_piece_by_piece(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt stored a moment ago is loaded while its store is still on the wire: each load waits for the
    store piece writing its slot only (pieces shrunk here so one store spans 32 of them), and gets its bytes."""
    monkeypatch.setattr(cuda_copy, "PIECE_BYTES", 1 << 20)  # 2 pages of 8 layers x 64 KiB per piece
    cache, kv = big_cache()
    pool = make_pool(kv, slots=4, pages_per_slot=16, fill="random")
    copier = BACKENDS[backend](kv, pool)
    stored = list(range(0, 64))
    expected = layer_pages(cache, stored).cpu()
    ids = torch.tensor(stored)
    copier.store(ids, ids // 16, ids % 16)
    fences = [copier.load(*chunk(list(range(64 + 16 * i, 80 + 16 * i)), i)) for i in range(4)]
    for fence in fences:
        fence.wait()
    assert torch.equal(layer_pages(cache, list(range(64, 128))).cpu(), expected)
    assert all(f.seconds() is None or f.seconds() > 0 for f in fences)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("slot_order", ["consecutive", "scattered", "partial"])
def test_sync_load_is_seen_by_the_compute_stream_layer_by_layer(backend: str, layerwise: bool,
                                                                slot_order: str) -> None:
    """What the forward relies on: after ``wait_layer(l)`` (layer-wise) or at once (whole load), work queued
    on the compute stream reads layer l's loaded pages, with no host-side wait anywhere. Consecutive slots
    take one 2D DMA per layer, scattered ones a batched DMA, partial chunks per-run DMAs."""
    cache, kv = big_cache()
    pool = make_pool(kv, slots=8, pages_per_slot=16, fill="random")
    copier = BACKENDS[backend](kv, pool)
    ids = torch.arange(8, 72)  # 4 whole slots
    slots, pages = (ids - 8) // 16, (ids - 8) % 16
    if slot_order == "scattered":
        slots = torch.tensor([6, 1, 4, 2]).repeat_interleave(16)
    elif slot_order == "partial":
        ids, slots, pages = ids[4:60], slots[4:60] * 2, pages[4:60]  # runs starting and ending mid-slot
    torch.cuda._sleep(20_000_000)  # a busy compute stream: nothing below may finish by accident
    copier.load_sync(ids, slots, pages, layerwise=layerwise)
    seen = []
    for layer in range(kv.num_layers):
        copier.wait_layer(layer)
        seen.append(kv.layers[layer][ids.cuda()].clone())  # queued on the compute stream
    copier.finish_layers()
    for layer, pages_seen in enumerate(seen):
        assert torch.equal(pages_seen.cpu(), pool[slots, layer, pages]), f"layer {layer}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reported", ["every layer", "some layers", "none"])
def test_layered_store_reads_each_layer_once_the_forward_wrote_it(reported: str) -> None:
    """The forward (a busy compute stream) writes each layer, then reports it; the layer's store must copy what
    was written, with no host-side wait anywhere; ``finish`` stores the layers never reported. Loads issued
    next read the stored slots (behind the store) and overwrite the stored blocks (after it gathered them)."""
    cache, kv = big_cache()
    pool = make_pool(kv, slots=8, pages_per_slot=16)
    copier = cuda_backend(kv, pool)
    ids = torch.arange(8, 72)  # 4 whole slots
    slots, pages = torch.tensor([6, 1, 4, 2]).repeat_interleave(16), (ids - 8) % 16
    store = copier.layered_store(ids, slots, pages)
    assert store is not None
    torch.cuda._sleep(20_000_000)
    expected = []
    for layer in range(kv.num_layers):  # nothing in this loop may synchronize with the compute stream
        torch.cuda._sleep(2_000_000)
        kv.layers[layer][ids.cuda()] = torch.randint(1, 256, (len(ids), kv.page_bytes), dtype=torch.uint8,
                                                     device="cuda")
        expected.append(kv.layers[layer][ids.cuda()].clone())
        if reported == "every layer" or (reported == "some layers" and layer % 3):
            store.layer(layer)
    fence = store.finish()
    reader, overwritten = list(range(100, 116)), list(range(8, 24))
    copier.load(*chunk(reader, 6))
    copier.load(*chunk(overwritten, 7))
    fence.wait()
    copier.fence().wait()
    torch.cuda.synchronize()
    for layer, pages_written in enumerate(expected):
        assert torch.equal(pool[slots, layer, pages], pages_written.cpu()), f"layer {layer}"
    assert torch.equal(layer_pages(cache, reader).cpu(), pool[6]), "a load overtook the store of its slot"
    assert torch.equal(layer_pages(cache, overwritten).cpu(), pool[7])
    assert fence.seconds() is not None and fence.seconds() > 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_copy_blocks_is_ordered_with_the_copy_streams(backend: str) -> None:
    """A copy between blocks (a chunk still held by a finished request) behind a busy compute stream: the
    forward queued after it reads the copied pages, and a load issued next into its source blocks (freed
    and reused) waits for the copy to have read them; a store of the destination reads the copied bytes."""
    cache, kv = big_cache()
    pool = make_pool(kv, slots=4, pages_per_slot=16, fill="random")
    copier = BACKENDS[backend](kv, pool)
    src, dst = list(range(0, 16)), list(range(32, 48))
    expected = layer_pages(cache, src).cpu()
    torch.cuda._sleep(50_000_000)  # the copy cannot run for a while
    copier.copy_blocks(torch.tensor(src), torch.tensor(dst))
    seen = layer_pages(cache, dst)  # the forward, queued on the compute stream
    copier.load(*chunk(src, 0))  # the source blocks, reused at once
    copier.store(*chunk(dst, 1))
    copier.fence().wait()
    torch.cuda.synchronize()
    assert torch.equal(seen.cpu(), expected), "the forward ran before the copy"
    assert torch.equal(layer_pages(cache, dst).cpu(), expected), "the load overwrote the source before it was read"
    assert torch.equal(layer_pages(cache, src).cpu(), pool[0])
    assert torch.equal(pool[1], expected)
