"""``benchmarks/scheduler_cost.py``: vLLM's real scheduler runs the seed script with and without kvoffload.

Beyond keeping the benchmark runnable, this is the seed script's scheduling checked at full size on a CPU:
10,004-token prompts that span several prefill chunks (vLLM schedules at most 16,384 tokens a step), stored by
the first run, must every one be found whole by the second (no model runs: the benchmark stands in for the
forward and for the workers' reports).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_second_run_loads_every_chunk_and_the_hooks_are_timed() -> None:
    proc = subprocess.run([sys.executable, "scheduler_cost.py", "--repeats", "1"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = re.search(r"Run 2 loaded at least (\d+) chunks \(all: (\d+)\)", proc.stdout)
    assert loaded is not None, proc.stdout
    assert loaded.group(1) == loaded.group(2) == "400"  # 10 prompts x 40 chunks (39 whole + the tail)
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (run[12]) \| (\d+) / (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", proc.stdout, re.M)}
    assert set(rows) == {"run1", "run2"}, proc.stdout
    steps_none, steps_offload, _, total_ms, hooks_ms = rows["run2"]
    assert int(steps_offload) < int(steps_none)  # loaded prompts need no prefill chunks of their own
    assert 0 < float(hooks_ms) < float(total_ms)
