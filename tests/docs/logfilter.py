"""Pick the lines a user looks for out of a vLLM run's output, for the logs shown in the docs."""

from __future__ import annotations

import re

_INTERESTING = re.compile(
    r"kvoffload|Storing KV cache|Loaded KV cache|KV Transfer metrics|^(first|second) \(|"
    r"^(First|Second) run|^Speedup|^(Cold|Warm) TTFT|^TTFT improvement|Application startup complete"
)
_TQDM = re.compile(r"^.*?(?=\((?:Worker|EngineCore|APIServer|MainProcess|VllmWorker)[^)]*pid=)")


def interesting_lines(output: str) -> list[str]:
    """Lines that mention kvoffload's lookups, stores, loads, or the examples' own results."""
    lines = []
    for raw in output.splitlines():
        line = _TQDM.sub("", raw.rstrip())  # tqdm bars share a line with the log record
        if "it/s]" in line and "(" not in line:
            continue
        if _INTERESTING.search(line):
            lines.append(line)
    return lines


def hit_tokens(output: str) -> list[int]:
    """The ``kvoffload hit tokens: H`` numbers of every scheduler lookup, in order."""
    return [int(m) for m in re.findall(r"kvoffload hit tokens: (\d+)", output)]


def hits_by_request(output: str) -> dict[str, int]:
    """Request id -> ``kvoffload hit tokens`` of its last lookup, in order of first appearance.

    The scheduler may look a request up more than once (for example while it waits for a token
    budget), so tests compare requests, not log lines.
    """
    result: dict[str, int] = {}
    for req, hits in re.findall(r"Reqid: ([^,\s]+), Total tokens \d+, kvoffload hit tokens: (\d+)", output):
        result[req] = int(hits)
    return result


def generated_texts(stdout: str) -> list[str]:
    """The ``generated text: …`` of each pass that examples/offline_offload.py prints, in order."""
    return [line.split("generated text: ", 1)[1] for line in stdout.splitlines() if "generated text: " in line]
