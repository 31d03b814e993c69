"""``benchmarks/e2e_gpu.py --merge``: the parts of a run split by mode and scenario join into one result file.

Runs the real script on small hand-written part files (the GPU run itself needs a GPU; joining does not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_gpu.py"
META = {"date": "2026-11-24", "arch": "qwen3-8b", "gpu": "H100"}


def part(tmp_path: Path, name: str, results: list[dict], meta: dict = META) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return str(path)


def merge(tmp_path: Path, *parts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--merge", *parts, "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=120)


def test_parts_join_per_mode_and_tokens_are_compared_across_parts(tmp_path: Path) -> None:
    seed = {"run1_s": 2.6, "run2_s": 0.45, "speedup": 5.8, "tokens": [[[1]], [[1]]]}
    chat = {"ttft_p50_s": 0.04, "ttft_p95_s": 0.07, "requests_per_s": 20.0, "tokens": [[[2]], [[3]]]}
    first = part(tmp_path, "a.json", [{"mode": "none", "engine_start_s": 37.0, "seed": seed},
                                      {"mode": "kvoffload", "engine_start_s": 32.0, "seed": seed}])
    other_tokens = {**chat, "tokens": [[[2]], [[4]]]}
    second = part(tmp_path, "b.json", [{"mode": "none", "engine_start_s": 30.0, "chat": chat},
                                       {"mode": "kvoffload", "engine_start_s": 29.0, "chat": other_tokens},
                                       {"mode": "kvoffload_disk", "engine_start_s": 31.0, "seed": seed}])
    proc = merge(tmp_path, first, second)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    by_mode = {r["mode"]: r for r in out["results"]}
    assert list(by_mode) == ["none", "kvoffload", "kvoffload_disk"]
    assert by_mode["kvoffload"]["seed"] == seed and by_mode["kvoffload"]["chat"]["ttft_p50_s"] == 0.04
    assert by_mode["none"]["engine_start_s"] == 37.0, "engine start must come from the first part that ran the mode"
    # kvoffload's chat tokens differ from none's in the other part: the comparison must catch it
    assert out["tokens_identical_to_none"] == {"kvoffload": False, "kvoffload_disk": True}


def test_parts_of_different_architectures_are_refused(tmp_path: Path) -> None:
    first = part(tmp_path, "a.json", [{"mode": "none", "engine_start_s": 1.0}])
    second = part(tmp_path, "b.json", [{"mode": "none", "engine_start_s": 1.0}], {**META, "arch": "llama-3.1-8b"})
    proc = merge(tmp_path, first, second)
    assert proc.returncode != 0 and "not all of one architecture" in proc.stderr
    assert not (tmp_path / "out.json").exists()
