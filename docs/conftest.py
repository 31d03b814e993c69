"""pytest over docs/: the pages' ``>>>`` examples (--doctest-glob='*.md') and the notebook (--nbval).

The notebook's kernel is a separate process that inherits this environment: point it at the tiny
random-weight test model with CPU limits before nbval starts the kernel (DOCS_MODEL overrides).
Sphinx does not read this file (it is no source suffix of conf.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "docs"))


def pytest_sessionstart(session) -> None:
    if session.config.getoption("nbval", default=False):
        from helpers import notebook_env

        notebook_env(os.environ)
