"""Send kvoffload's log records through vLLM's handler, so they appear in vLLM's log with its format."""

from __future__ import annotations

import logging


def route_through_vllm() -> None:
    ours, theirs = logging.getLogger("kvoffload"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False
