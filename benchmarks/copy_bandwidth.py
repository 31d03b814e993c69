"""Copy-path bandwidth and interference on one GPU (not a test; prints Markdown, optionally writes JSON).

For 8B-model KV shapes (bf16, 16-token blocks, 256-token chunks = 16 pages per layer, 40 chunks ~ 10k
tokens, random non-contiguous block ids in a large cache laid out like vLLM 0.32's default LBNHC) it
measures, in one run, store (GPU->host) and load (host->GPU) GB/s of:

* ``kernel``: :class:`CudaCopyBackend` (gather kernel + pipelined DMA),
* ``layer-wise`` (loads only): the same backend's layer-by-layer load, the one that runs beside a forward,
* ``torch``: :class:`TorchCopyBackend`,
* ``per-page``: one driver memcpy per page per layer (what a naive connector does),
* ``bulk``: one pinned memcpy of the same number of bytes (the line-rate ceiling),

and how much a prefill-sized bf16 GEMM loop slows down while each store path runs flat out beside it.

    PYTHONPATH=src python benchmarks/copy_bandwidth.py [--json results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from collections.abc import Callable

import torch

from kvoffload.transfer.base import CopyBackend, PagedKV
from kvoffload.transfer.cuda import CudaCopyBackend
from kvoffload.transfer.layout import paged_kv
from kvoffload.transfer.torch_copy import TorchCopyBackend

MODELS = {"Qwen3-8B": 36, "Llama-3.1-8B": 32}  # layers; both 8 KV heads of 128
KV_HEADS, HEAD, BLOCK_TOKENS, CHUNK_PAGES, CHUNKS = 8, 128, 16, 16, 40
CACHE_BLOCKS = 4096  # ~9 GiB of cache, so the 640 blocks of a copy list are scattered
GEMM = (8192, 4096, 12288)  # tokens x hidden x intermediate of one 8B-model MLP projection
REPS = 5


def make_cache(layers: int) -> PagedKV:
    """One shared buffer, layer-outermost, NHD inside (vLLM 0.32's default for FlashAttention)."""
    raw = torch.randint(-128, 128, (layers, CACHE_BLOCKS, BLOCK_TOKENS, KV_HEADS, 2 * HEAD * 2),
                        dtype=torch.int8, device="cuda")
    typed = raw.view(torch.bfloat16)
    return paged_kv([typed[l].permute(0, 2, 1, 3) for l in range(layers)], CACHE_BLOCKS)


def copy_list(block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk k of the list goes to pool slot k, pages 0..15."""
    slots = torch.arange(CHUNKS).repeat_interleave(CHUNK_PAGES)
    return block_ids, slots, torch.arange(CHUNK_PAGES).repeat(CHUNKS)


def timed(fn: Callable[[], None], reps: int) -> float:
    """Seconds per call after one warm-up, wall clock, each call finished before the next (CPU cost included)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def backend_call(backend: CopyBackend, direction: str, ids: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        getattr(backend, direction)(*copy_list(ids))
        backend.fence().wait()
    return call


def layerwise_call(backend: CopyBackend, ids: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        backend.load_sync(*copy_list(ids), layerwise=True)
        backend.finish_layers()
        backend.fence().wait()
    return call


class PerPage:
    """One ``cuMemcpy{DtoH,HtoD}Async`` per page per layer, issued from a tight loop through ctypes."""

    def __init__(self, kv: PagedKV, pool: torch.Tensor) -> None:
        self.driver = ctypes.CDLL("libcuda.so.1")
        self.driver.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self.driver.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.kv, self.pool, self.stream = kv, pool, torch.cuda.Stream()

    def pairs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """(device address, host address) of every page of the copy list."""
        page, pps = self.kv.page_bytes, self.pool.shape[2]
        out = []
        for block, slot, p in zip(*(t.tolist() for t in copy_list(ids))):
            for layer_index, layer in enumerate(self.kv.layers):
                host = self.pool.data_ptr() + ((slot * self.kv.num_layers + layer_index) * pps + p) * page
                out.append((layer.data_ptr() + block * layer.stride(0), host))
        return out

    def call(self, direction: str, ids: torch.Tensor) -> Callable[[], None]:
        pairs, page, stream = self.pairs(ids), self.kv.page_bytes, self.stream.cuda_stream
        d2h, h2d = self.driver.cuMemcpyDtoHAsync_v2, self.driver.cuMemcpyHtoDAsync_v2

        def run() -> None:
            failed = 0
            if direction == "store":
                for dev, host in pairs:
                    failed |= d2h(host, dev, page, stream)
            else:
                for dev, host in pairs:
                    failed |= h2d(dev, host, page, stream)
            if failed:
                raise RuntimeError("a per-page cuMemcpyAsync failed")
            self.stream.synchronize()
        return run


def bulk_call(pool: torch.Tensor, device_buffer: torch.Tensor, direction: str) -> Callable[[], None]:
    host = pool.view(-1)[:device_buffer.numel()]
    stream = torch.cuda.Stream()

    def run() -> None:
        with torch.cuda.stream(stream):
            (host.copy_(device_buffer, non_blocking=True) if direction == "store"
             else device_buffer.copy_(host, non_blocking=True))
        stream.synchronize()
    return run


def gemm_ms(issue_copies: Callable[[], None] | None, iters: int = 60) -> float:
    """Mean ms of one GEMM on the default stream, optionally with copies queued on other streams first."""
    m, k, n = GEMM
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    if issue_copies is not None:
        issue_copies()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.mm(a, b, out=c)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_sample(kv: PagedKV, pool: torch.Tensor, ids: torch.Tensor, picks: int = 8) -> bool:
    """A few pages of the copy list compared byte for byte (the tests cover everything; this guards the numbers)."""
    block_ids, slots, pages = (t.tolist() for t in copy_list(ids))
    for i in torch.randperm(len(block_ids))[:picks].tolist():
        for layer in (0, kv.num_layers - 1):
            if not torch.equal(kv.layers[layer][block_ids[i]].cpu(), pool[slots[i], layer, pages[i]]):
                return False
    return True


def bench_model(name: str, layers: int) -> dict:
    kv = make_cache(layers)
    pool = torch.empty((CHUNKS, layers, CHUNK_PAGES, kv.page_bytes), dtype=torch.uint8, pin_memory=True)
    nbytes = pool.numel()
    perm = torch.randperm(CACHE_BLOCKS)
    store_ids, load_ids = perm[:CHUNKS * CHUNK_PAGES], perm[CHUNKS * CHUNK_PAGES:2 * CHUNKS * CHUNK_PAGES]
    device_buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    kernel, torch_path, per_page = CudaCopyBackend(kv, pool), TorchCopyBackend(kv, pool), PerPage(kv, pool)

    result: dict = {"model": name, "layers": layers, "page_bytes": kv.page_bytes, "bytes_per_copy": nbytes,
                    "gbps": {}, "verified": {}}
    for direction, ids in (("store", store_ids), ("load", load_ids)):
        calls = {"kernel": backend_call(kernel, direction, ids), "torch": backend_call(torch_path, direction, ids),
                 "per-page": per_page.call(direction, ids), "bulk": bulk_call(pool, device_buffer, direction)}
        if direction == "load":
            calls["layer-wise"] = layerwise_call(kernel, ids)
        result["gbps"][direction] = {}
        for method, call in calls.items():
            seconds = timed(call, reps=2 if method == "per-page" else REPS)
            result["gbps"][direction][method] = nbytes / seconds / 1e9
        # the bulk copy wrote the pool (store) or nothing in the cache (load): redo the kernel path, then check it
        calls["kernel"]()
        result["verified"][direction] = check_sample(kv, pool, ids)

    def within() -> None:  # a load of a chunk still held in a finished request's blocks
        kernel.copy_blocks(store_ids, load_ids)
        torch.cuda.synchronize()
    result["within_cache_gbps"] = nbytes / timed(within, reps=REPS) / 1e9
    before = torch.stack([layer[store_ids[:8].cuda()] for layer in kv.layers])
    within()
    result["verified"]["within"] = torch.equal(torch.stack([layer[load_ids[:8].cuda()] for layer in kv.layers]), before)

    def store_stream(backend: CopyBackend | None, copies: int = 6) -> Callable[[], None]:
        """Queue ``copies`` full stores (~6 x 28 ms at line rate) from an idle 'compute' stream, enough to
        outlast the ~60 x 1.2 ms of GEMMs queued after them even when issuing the stores costs CPU time."""
        idle = torch.cuda.Stream()

        def issue() -> None:
            with torch.cuda.stream(idle):
                for _ in range(copies):
                    if backend is None:
                        pool.view(-1).copy_(device_buffer, non_blocking=True)
                    else:
                        backend.store(*copy_list(store_ids))
        return issue

    alone, beside = [gemm_ms(None)], {}
    for label, backend in (("kernel", kernel), ("torch", torch_path), ("bulk", None)):
        beside[label] = gemm_ms(store_stream(backend))
        alone.append(gemm_ms(None))  # interleaved, so clock/power drift shows up as spread
    result["gemm_ms"] = {"alone": sum(alone) / len(alone), "alone_spread": max(alone) - min(alone), **beside}
    kernel.close()
    torch_path.close()
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| model | direction | kernel GB/s | layer-wise GB/s | torch GB/s | per-page GB/s | bulk GB/s | "
             "kernel/bulk | verified |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for direction, g in r["gbps"].items():
            layerwise = f"{g['layer-wise']:.1f}" if "layer-wise" in g else "-"
            lines.append(f"| {r['model']} | {direction} | {g['kernel']:.1f} | {layerwise} | {g['torch']:.1f} | "
                         f"{g['per-page']:.1f} | {g['bulk']:.1f} | {g['kernel'] / g['bulk']:.1%} | "
                         f"{r['verified'][direction]} |")
    lines += ["", "A chunk still held in a finished request's blocks, copied within the KV cache instead of loaded:", ""]
    lines += [f"- {r['model']}: {r['within_cache_gbps']:.0f} GB/s of KV (verified: {r['verified']['within']})"
              for r in results if "within_cache_gbps" in r]
    lines += ["", f"GEMM {'x'.join(map(str, GEMM))} bf16, ms per GEMM (slowdown vs alone) while stores run at full rate:",
              "", "| model | alone | + kernel store | + torch store | + bulk DMA |", "|---|---|---|---|---|"]
    for r in results:
        g = r["gemm_ms"]
        cells = [f"{g[k]:.3f} ({g[k] / g['alone'] - 1:+.1%})" for k in ("kernel", "torch", "bulk")]
        lines.append(f"| {r['model']} | {g['alone']:.3f} (spread {g['alone_spread']:.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    start = time.perf_counter()
    from kvoffload.transfer.cuda import extension
    extension()
    print(f"extension ready in {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}", flush=True)
    results = []
    for name, layers in MODELS.items():
        results.append(bench_model(name, layers))
        torch.cuda.empty_cache()
    print(markdown(results))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "chunks": CHUNKS, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
