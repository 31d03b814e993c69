# SPDX-License-Identifier: Apache-2.0
"""Print the KV cache events of a vLLM server, as a cache-aware router reads them.

Start vLLM with kvoffload and KV events on (prefix caching too, so vLLM reports its GPU blocks beside
kvoffload's CPU and STORAGE ones), then:

    python examples/kv_events_subscriber.py --endpoint tcp://127.0.0.1:5557
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator


# [start-subscribe]
def kv_events(endpoint: str, stop: threading.Event) -> Iterator[object]:
    """Yield every event vLLM publishes at ``endpoint`` until ``stop`` is set."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)  # before or after vLLM binds it: ZMQ connects when it can
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    try:
        while not stop.is_set():
            if sub.poll(100):
                _topic, _sequence, payload = sub.recv_multipart()
                yield from decoder.decode(payload).events
    finally:
        sub.close()
# [end-subscribe]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5557")
    args = parser.parse_args()
    for event in kv_events(args.endpoint, threading.Event()):
        hashes = getattr(event, "block_hashes", [])
        print(f"{type(event).__name__:13} medium={getattr(event, 'medium', None)!s:8} blocks={len(hashes)}",
              flush=True)


if __name__ == "__main__":
    main()
