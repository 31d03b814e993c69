"""The notebook's check of offloading has teeth: without kvoffload it fails, though its text matches.

scripts/test.sh runs the notebook itself (``pytest --nbval docs/notebooks``); this is its negative
control. The same notebook with the connector left out of the engine still runs every cell and still
prints ``same text: True``, but the warm run finds nothing to load, so the cell that asserts a hit
must fail, and only that one.
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from helpers import NBVAL_ARGS, NOTEBOOK, ROOT, example_env, notebook_env

CONNECTOR = """    kv_transfer_config=KVTransferConfig(
        kv_connector="KVOffloadConnector",
        kv_role="kv_both",
        kv_connector_extra_config=extra_config,
    ),
"""


@pytest.mark.vllm
def test_notebook_fails_when_nothing_is_loaded(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    engine = [cell for cell in nb.cells if cell.cell_type == "code" and CONNECTOR in cell.source]
    assert len(engine) == 1, "the notebook's engine cell changed: update CONNECTOR"
    engine[0].source = engine[0].source.replace(CONNECTOR, "")
    copy = tmp_path / NOTEBOOK.name
    nbformat.write(nb, copy)
    env = example_env()
    notebook_env(env)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                           "--rootdir", str(tmp_path), *NBVAL_ARGS, str(copy)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "the warm run recomputed the whole prompt: kvoffload loaded nothing" in output, output[-4000:]
    assert "1 failed, 5 passed" in output, output[-4000:]
