"""Worker-side host pool: one exact-size buffer of chunk slots, pinned in the background on CUDA.

Why not ``torch.empty(..., pin_memory=True)``: torch's pinned allocator rounds up to a power of two
(1.78x the host memory for some sizes) and pins on the calling thread, which for a 15 GB pool blocks
engine start for seconds. Instead the buffer is allocated unpinned (the kernel maps pages lazily, so
nothing is touched yet), and a background thread touches it and registers it with
``cudaHostRegister`` in pieces, so the engine starts without waiting for it. The first copy waits for
``ready`` (a request arriving in the first seconds after start waits for the rest of the pinning, once).
If pinning fails the pool stays pageable: slower copies, nothing lost. Host memory used is the pool's
exact size.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# cudaHostRegister of very large ranges fails (>= 512 GiB seen); register pieces of at most 16 GiB, cut at slot
# boundaries, because one DMA may not span two registrations and a slot is copied with one DMA.
_REGISTER_MAX = 16 << 30
_TOUCH_PIECE = 1 << 30


def _relax_capture_mode() -> None:
    """Let this thread call cudaHostRegister while vLLM captures CUDA graphs on its own thread.

    vLLM captures in the global mode, which forbids "unsafe" calls such as cudaHostRegister from every
    thread in the process and invalidates the capture when one is made (the engine then fails to start
    with cudaErrorStreamCaptureInvalidated). The relaxed mode exempts only this thread; registering host
    memory enqueues no work, so it cannot conflict with the captured streams. torch does not bind the call,
    hence ctypes on the CUDA runtime torch already loaded.
    """
    runtime = ctypes.CDLL(_loaded_cudart())
    mode = ctypes.c_int(2)  # cudaStreamCaptureModeRelaxed
    err = runtime.cudaThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    if err != 0:
        raise RuntimeError(f"cudaThreadExchangeStreamCaptureMode failed with error {err}")


def _loaded_cudart() -> str:
    """The CUDA runtime library this process uses (torch loaded it; the capture mode is its per-thread state)."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcudart.so" in path:
                return path
    return f"libcudart.so.{(torch.version.cuda or '').split('.')[0]}"


class HostPool:
    def __init__(self, num_slots: int, num_layers: int, pages_per_slot: int, page_bytes: int,
                 pin: bool) -> None:
        self.shape = (num_slots, num_layers, pages_per_slot, page_bytes)
        self.tensor = torch.empty(self.shape, dtype=torch.uint8)
        self.nbytes = self.tensor.numel()
        self.pinned = False  # set once cudaHostRegister covered the whole pool
        self._registered: list[tuple[int, int]] = []
        self._ready = threading.Event()
        if pin and self.nbytes:
            self._thread = threading.Thread(target=self._pin, name="kvoffload-pin", daemon=True)
            self._thread.start()
        else:
            self._ready.set()

    def payload(self, slot: int, num_pages: int) -> memoryview:
        """The bytes a persistent tier stores for a chunk: every layer's first ``num_pages`` pages.

        A whole slot is one contiguous range and is returned without a copy; a partial chunk's pages are
        strided by layer, so they are gathered into a new buffer.
        """
        if num_pages == self.shape[2]:
            return memoryview(self.tensor[slot].numpy()).cast("B")
        return memoryview(self.tensor[slot, :, :num_pages].contiguous().numpy()).cast("B")

    def fill(self, slot: int, num_pages: int, read: Callable[[memoryview], bool]) -> bool:
        """Let ``read`` fill a chunk's payload straight into the slot (through a buffer when partial)."""
        if num_pages == self.shape[2]:
            return read(memoryview(self.tensor[slot].numpy()).cast("B"))
        staging = torch.empty((self.shape[1], num_pages, self.shape[3]), dtype=torch.uint8)
        if not read(memoryview(staging.numpy()).cast("B")):
            return False
        self.tensor[slot, :, :num_pages].copy_(staging)
        return True

    def _pin(self) -> None:
        start = time.perf_counter()
        base = self.tensor.data_ptr()
        flat = self.tensor.view(-1)
        slot_bytes = self.nbytes // self.shape[0]
        piece = max(1, _REGISTER_MAX // slot_bytes) * slot_bytes
        try:
            cudart = torch.cuda.cudart()
            _relax_capture_mode()
            # The cost is the kernel faulting and zeroing pages, which parallelises; registration is cheap.
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as touch:
                list(touch.map(lambda start: flat[start:start + _TOUCH_PIECE:4096].zero_(),
                               range(0, self.nbytes, _TOUCH_PIECE)))
            for offset in range(0, self.nbytes, piece):
                size = min(piece, self.nbytes - offset)
                err = cudart.cudaHostRegister(base + offset, size, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister failed with error {int(err)}")
                self._registered.append((base + offset, size))
        except Exception as exc:  # pinning is an optimisation: a pageable pool copies slower but works
            self._unregister()
            logger.warning("kvoffload: could not pin %.1f GB of host memory (%s); the CPU pool stays pageable and "
                           "copies use the slower torch path. Lower max_local_cpu_size or raise the locked-memory "
                           "limit (ulimit -l).", self.nbytes / 1e9, exc)
        else:
            self.pinned = True
            logger.info("kvoffload: pinned %.2f GB host pool in %.2f s", self.nbytes / 1e9, time.perf_counter() - start)
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        if hasattr(self, "_thread"):
            self._thread.join()
        self._unregister()

    def _unregister(self) -> None:
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr, _ in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered.clear()
