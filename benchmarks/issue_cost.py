"""CPU time to issue one load on the CUDA copy path: time spent on vLLM's engine thread before the copy runs.

One wave of the seed script's second run (4 requests x 40 chunks of 256 tokens, the last chunk of each one
page long as for a 10,004-token prompt; Qwen3-8B KV shapes, scattered blocks), issued ten times each way:
layer by layer (the load that runs beside its step's forward) and whole (an asynchronous load). Prints the
issue times in ms, sorted, and the copy's median duration measured on the GPU.

    PYTHONPATH=src python benchmarks/issue_cost.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from copy_bandwidth import CACHE_BLOCKS, CHUNK_PAGES, make_cache
from kvoffload.transfer.cuda import CudaCopyBackend

LAYERS, REQUESTS, CHUNKS = 36, 4, 40
REPS = 10


def copy_list() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Request r's chunk c goes to slot r * CHUNKS + c; a request's last chunk holds one page."""
    ids, slots, pages = [], [], []
    for slot in range(REQUESTS * CHUNKS):
        n = 1 if slot % CHUNKS == CHUNKS - 1 else CHUNK_PAGES
        slots += [slot] * n
        pages += list(range(n))
    ids = torch.randperm(CACHE_BLOCKS)[:len(slots)].tolist()
    return torch.tensor(ids), torch.tensor(slots), torch.tensor(pages)


def measure(issue: Callable[[], object], backend: CudaCopyBackend) -> tuple[list[float], float]:
    """Issue times (ms) of REPS loads, each finished before the next, and the median copy seconds."""
    issue_ms, copy_s = [], []
    for rep in range(REPS + 2):  # two warm-ups
        start = time.perf_counter()
        fence = issue()
        elapsed = time.perf_counter() - start
        backend.finish_layers()
        fence.wait()
        torch.cuda.synchronize()
        if rep >= 2:
            issue_ms.append(elapsed * 1e3)
            copy_s.append(fence.seconds())
    return sorted(issue_ms), sorted(copy_s)[REPS // 2]


def main() -> None:
    kv = make_cache(LAYERS)
    pool = torch.empty((REQUESTS * CHUNKS, LAYERS, CHUNK_PAGES, kv.page_bytes), dtype=torch.uint8, pin_memory=True)
    backend = CudaCopyBackend(kv, pool)
    copies = copy_list()
    for name, issue in (("layer-wise", lambda: backend.load_sync(*copies, layerwise=True)),
                        ("whole", lambda: backend.load(*copies))):
        issue_ms, copy_s = measure(issue, backend)
        print(f"{name}: issue ms {', '.join(f'{ms:.2f}' for ms in issue_ms)}; copy median {copy_s * 1e3:.1f} ms "
              f"({len(copies[0]) * LAYERS * kv.page_bytes / copy_s / 1e9:.1f} GB/s)")
    backend.close()


if __name__ == "__main__":
    main()
