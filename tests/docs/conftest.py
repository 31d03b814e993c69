"""Fixtures for the documentation and example tests (tests/docs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ROOT  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A Qwen3-shaped 2-layer random-weight model (no download). DOCS_TINY_MODEL reuses one."""
    cached = os.environ.get("DOCS_TINY_MODEL")
    path = Path(cached) if cached else tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_model.py"), str(path)], check=True,
                   capture_output=True, timeout=300)
    return str(path)


@pytest.fixture(scope="session")
def built_site() -> Path:
    """Both languages built once per session by the one documented command."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build_docs.sh")], cwd=ROOT, check=True, timeout=900)
    return ROOT / "build" / "html"
