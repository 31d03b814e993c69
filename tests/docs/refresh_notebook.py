"""Re-run docs/notebooks/quickstart.ipynb on the tiny test model and store its outputs (then commit).

nbval compares a fresh run with the stored outputs of the cells it checks, and the docs show them. The
engine cells print vLLM's whole log; their stored outputs keep kvoffload's lines and the cell's own
prints, the abridged log the notebook's text describes. nbval ignores those cells' outputs.

    flock /tmp/vllm-engine.lock python tests/docs/refresh_notebook.py
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import NOTEBOOK, ROOT, example_env, notebook_env  # noqa: E402
from logfilter import interesting_lines  # noqa: E402

_OWN_PRINTS = re.compile(r"^(cold|warm): \d")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # vLLM colours its log when it thinks it writes to a terminal


def abridge(outputs: list[dict]) -> list[dict]:
    text = _ANSI.sub("", "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream"))
    keep: list[str] = []
    for line in text.splitlines():
        keep.extend([line] if _OWN_PRINTS.match(line) else interesting_lines(line))
    return [{"name": "stdout", "output_type": "stream", "text": "".join(f"{line}\n" for line in keep)}]


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    env = example_env()
    notebook_env(env)
    os.environ.update(env)  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for cell in nb.cells:
        if cell.cell_type == "code" and "NBVAL_IGNORE_OUTPUT" in cell.source:
            cell.outputs = nbformat.from_dict(abridge(cell.outputs))
        if cell.cell_type == "code":
            cell.metadata.pop("execution", None)
    nbformat.write(nb, NOTEBOOK)
    print(f"refreshed {NOTEBOOK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
