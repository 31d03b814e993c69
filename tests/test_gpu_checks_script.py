"""benchmarks/gpu_vllm_checks.sh, the one command that runs every gpu test on the GPU machine, run here (no GPU).

There kvoffload is not installed (vLLM is carried on PYTHONPATH), so the script registers the plugin's entry
point from pyproject.toml before pytest starts engines that select the connector by name. Here every gpu test
skips, so this checks the registration and the test selection, not the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_registers_the_plugin_and_selects_every_gpu_test(tmp_path: Path) -> None:
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(site), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_vllm_checks.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Only what the script wrote in ``site`` (kvoffload may be installed here too)
    found = [ep.value for dist in distributions(path=[str(site)]) for ep in dist.entry_points
             if ep.group == "vllm.general_plugins" and ep.name == "kvoffload"]
    assert found == ["kvoffload.vllm.plugin:register"]
    log = (out / "gpu_pytest.log").read_text()
    for name in ("test_copy_path.py", "test_vllm_connector.py", "test_hybrid_models.py", "test_examples_gpu.py"):
        assert name in log, f"{name}'s gpu tests were not selected"
    assert " failed" not in log and " error" not in log
