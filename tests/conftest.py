"""Shared fixtures: the tiny model, and running a real vLLM engine in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny_model import write_tiny_model

pytest_plugins = ["tests.redis_server", "tests.redis_cluster"]

ROOT = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU; run on the GPU machine"))
        if "vllm" in item.keywords and not HAS_VLLM:
            item.add_marker(pytest.mark.skip(reason="vLLM is not installed"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Qwen3-shaped model with random weights, written once per session (or KVO_TEST_MODEL)."""
    path = os.environ.get("KVO_TEST_MODEL") or str(tmp_path_factory.mktemp("tiny-qwen3"))
    return str(write_tiny_model(path))


@dataclass
class EngineRun:
    rounds: list[list[list[int]]]
    metrics: dict
    log: str
    texts: list[list[str]] | None = None
    margins: list[list[list[float]]] | None = None  # per round, prompt and token: top-2 logprob margin

    def hit_tokens(self) -> list[int]:
        return [int(h) for h in re.findall(r"kvoffload hit tokens: (\d+)", self.log)]

    def loaded_tokens(self) -> list[int]:
        return [int(n) for n in re.findall(r"need to load: (\d+)", self.log)]


def run_engine(spec: dict, env: dict | None = None, timeout: float = 420, expect_ok: bool = True) -> EngineRun:
    """Run tests/vllm_runner.py with ``spec``; one engine, one process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:  # argv caps one argument at 128 KiB
        json.dump(spec, file)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_runner.py"), "@" + file.name],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                               **(env or {})})
    os.unlink(file.name)
    log = proc.stdout + proc.stderr
    if not expect_ok:
        return EngineRun(rounds=[], metrics={"returncode": proc.returncode}, log=log)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"rounds"')]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"engine failed (exit {proc.returncode}):\n{log[-6000:]}")
    result, _ = json.JSONDecoder().raw_decode(lines[-1])  # another process may append to the same line
    return EngineRun(rounds=result["rounds"], metrics=result["metrics"], log=log, texts=result.get("texts"),
                     margins=result.get("margins"))
