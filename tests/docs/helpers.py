"""Shared constants and helpers of the documentation and example tests (tests/docs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Flags that make the examples fit a 2-core CPU runner with the tiny model. Prompts are longer than
#: --max-num-batched-tokens so that each prompt spans several prefill chunks, as on a GPU.
CPU_ENGINE_ARGS = ["--max-model-len", "4096", "--gpu-memory-utilization", "0.3",
                   "--max-num-batched-tokens", "512"]

#: Set DOCS_UPDATE_LOGS=1 to rewrite docs/_static/logs/*.log from the runs (then commit).
UPDATE_LOGS = os.environ.get("DOCS_UPDATE_LOGS") == "1"


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.pop("KVOFFLOAD_CONFIG_FILE", None)
    return env


def write_log(name: str, lines: list[str], header: str) -> None:
    if UPDATE_LOGS:
        path = ROOT / "docs" / "_static" / "logs" / name
        path.write_text(f"# {header}\n" + "\n".join(lines) + "\n", encoding="utf-8")



#: What the notebook (docs/notebooks/quickstart.ipynb) reads to fit a 2-core CPU runner: the tiny model's
#: path is added by :func:`notebook_env`. Without these it starts Qwen/Qwen3-8B with GPU-sized limits.
NOTEBOOK_LIMITS = {"DOCS_MAX_MODEL_LEN": "4096", "DOCS_GPU_MEMORY_UTILIZATION": "0.3",
                   "DOCS_MAX_NUM_BATCHED_TOKENS": "512"}
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
NBVAL_ARGS = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with",
              str(ROOT / "docs" / "notebooks" / "nbval_sanitize.cfg")]


def tiny_model_dir() -> Path:
    """The tiny random-weight model of the docs runs (DOCS_TINY_MODEL, else build/tiny-model), written if missing."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import write_tiny_model

    return write_tiny_model(os.environ.get("DOCS_TINY_MODEL") or ROOT / "build" / "tiny-model")


def notebook_env(environ: dict[str, str]) -> None:
    """Point the notebook at the tiny model with CPU limits, unless DOCS_MODEL names another model."""
    if "DOCS_MODEL" not in environ:
        environ["DOCS_MODEL"] = str(tiny_model_dir())
        for key, value in NOTEBOOK_LIMITS.items():
            environ.setdefault(key, value)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGINT (vLLM shuts down cleanly), SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
