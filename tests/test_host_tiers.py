"""The host pool (worker side) and its index (scheduler side)."""

from __future__ import annotations

import logging

import pytest
import torch

from kvoffload.tiers import host_pool
from kvoffload.tiers.host_index import HostIndex, SlotState
from kvoffload.tiers.host_pool import HostPool


def test_index_evicts_least_recently_used_idle_chunks_only() -> None:
    index = HostIndex(3)
    a, b, c = (index.prepare(key, 2, SlotState.STORING) for key in (b"a", b"b", b"c"))
    assert index.prepare(b"d", 2, SlotState.STORING) is None  # nothing is READY yet: nothing to evict
    for entry in (a, b, c):
        index.complete(entry, ok=True)
    index.touch(a)
    index.pin(b)
    d = index.prepare(b"d", 2, SlotState.STORING)
    assert d is not None and index.get(b"c") is None  # b is pinned, a was touched: c goes
    assert index.evictions == 1
    index.unpin(b)
    assert index.prepare(b"e", 1, SlotState.PREFETCHING) is not None and index.get(b"b") is None
    assert index.used_slots == 3 and len({index.get(k).slot for k in (b"a", b"d", b"e")}) == 3


def test_a_pin_holds_its_own_entry_never_a_later_one_of_the_same_key() -> None:
    """A failed prefetch drops its entry while a waiting request still pins it: the key may get a new entry
    at once, the old slot is freed only at the old entry's last unpin, and that unpin leaves the new one alone
    (keyed pins released the new entry's pin, so an eviction could overwrite it under its load)."""
    index = HostIndex(2)
    old = index.prepare(b"k", 1, SlotState.PREFETCHING)
    index.pin(old)  # a request waiting for the prefetch
    index.complete(old, ok=False)
    assert index.get(b"k") is None and index.used_slots == 1, "a pinned slot was freed"
    new = index.prepare(b"k", 1, SlotState.STORING)
    assert new is not None and new.slot != old.slot
    index.complete(new, ok=True)
    index.pin(new)  # a load planned from the new entry
    index.unpin(old)
    assert index.used_slots == 1 and new.pins == 1 and index.get(b"k") is new
    assert index.prepare(b"x", 1, SlotState.STORING) is not None  # the old slot is free again
    assert index.prepare(b"y", 1, SlotState.STORING) is None, "the pinned new entry was evicted"
    with pytest.raises(RuntimeError, match="unpinned more often"):
        index.unpin(old)


def test_pool_is_exactly_the_configured_size_and_payloads_round_trip() -> None:
    pool = HostPool(num_slots=4, num_layers=3, pages_per_slot=4, page_bytes=256, pin=False)
    assert pool.nbytes == 4 * 3 * 4 * 256 and pool.wait_ready(0)
    pool.tensor.copy_(torch.randint(0, 255, pool.shape, dtype=torch.uint8))
    whole = bytes(pool.payload(1, 4))
    assert whole == pool.tensor[1].numpy().tobytes()
    partial = bytes(pool.payload(2, 2))  # every layer's first two pages
    assert partial == pool.tensor[2, :, :2].contiguous().numpy().tobytes()

    def reader(data: bytes):
        def read(out: memoryview) -> bool:
            out[:] = data
            return True
        return read

    assert pool.fill(3, 2, reader(partial))
    assert torch.equal(pool.tensor[3, :, :2], pool.tensor[2, :, :2])
    assert not pool.fill(0, 4, lambda out: False)


def test_pool_that_cannot_be_pinned_stays_pageable_and_serves(monkeypatch, caplog) -> None:
    """Pinning is an optimisation: when cudaHostRegister fails (ulimit -l, containers) the pool becomes ready
    unpinned, with a warning that says what to do, and copies take the torch path. (The failure is forced,
    so the test means the same on a GPU machine; without CUDA, cudart itself fails the same way.)"""
    def refuse():
        raise RuntimeError("cudaHostRegister failed with error 1")

    monkeypatch.setattr(torch.cuda, "cudart", refuse)
    caplog.set_level(logging.WARNING, logger="kvoffload")
    pool = HostPool(num_slots=4, num_layers=3, pages_per_slot=4, page_bytes=256, pin=True)
    assert pool.wait_ready(60) and not pool.pinned and pool._registered == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not pin" in m and "ulimit -l" in m and "stays pageable" in m for m in messages), messages
    pool.close()


@pytest.mark.gpu
def test_pool_pins_while_a_cuda_graph_is_being_captured() -> None:
    """vLLM captures CUDA graphs (global capture mode) while the pool pins in the background: the
    registration must neither invalidate the capture (engine start failed with
    cudaErrorStreamCaptureInvalidated) nor fail itself."""
    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
        pool = HostPool(num_slots=8, num_layers=3, pages_per_slot=4, page_bytes=65536, pin=True)
        assert pool.wait_ready(60)
        y += 1
    graph.replay()
    torch.cuda.synchronize()
    assert pool.pinned and torch.equal(y, torch.full_like(x, 3.0))
    pool.close()


@pytest.mark.gpu
def test_pinned_pool_serves_dma_for_slots_across_registration_pieces(monkeypatch) -> None:
    """A slot must never straddle two cudaHostRegister ranges: one DMA cannot span them."""
    from kvoffload.transfer import make_copy_backend
    from kvoffload.transfer.layout import paged_kv

    slot = 3 * 4 * 65536
    monkeypatch.setattr(host_pool, "_REGISTER_MAX", int(2.5 * slot))  # pieces of 2 slots
    pool = HostPool(num_slots=7, num_layers=3, pages_per_slot=4, page_bytes=65536, pin=True)
    assert pool.wait_ready(60) and len(pool._registered) == 4
    layers = [torch.randint(0, 255, (64, 65536), dtype=torch.uint8, device="cuda") for _ in range(3)]
    backend = make_copy_backend(paged_kv(layers, 64), pool.tensor, "cuda")
    ids = torch.arange(28, dtype=torch.int64) * 2
    slots = torch.arange(28, dtype=torch.int64) // 4
    pages = torch.arange(28, dtype=torch.int64) % 4
    backend.store(ids, slots, pages)
    backend.fence().wait()
    expected = [layer[ids].cpu() for layer in layers]
    for layer in layers:
        layer.zero_()
    backend.load(ids, slots, pages)
    torch.cuda.synchronize()
    for layer, want in zip(layers, expected):
        assert torch.equal(layer[ids].cpu(), want)
    backend.close()
    pool.close()


def test_host_memory_used_is_the_pool_size(tmp_path) -> None:
    """RSS grows by the pool's bytes once every page is touched: no power-of-two rounding, no copies."""
    code = """
import resource, sys
from kvoffload.tiers.host_pool import HostPool
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss()
pool = HostPool(num_slots=300, num_layers=2, pages_per_slot=2, page_bytes=262144, pin=False)
pool.tensor.fill_(1)
print(before, rss(), pool.nbytes)
"""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, nbytes = map(int, proc.stdout.split())
    assert nbytes == 300 * 2 * 2 * 262144
    assert after - before <= 1.05 * nbytes
    assert after - before >= 0.95 * nbytes
