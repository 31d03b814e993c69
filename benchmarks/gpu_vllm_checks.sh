#!/usr/bin/env bash
# Every `gpu` test in one command, on the GPU machine with vLLM carried there as ../shared/gpu/README.md says
# (on PYTHONPATH, no pip, no network). kvoffload is not installed there, so first its `vllm.general_plugins`
# entry point is registered the way an install registers it: a .dist-info folder (from pyproject.toml) in the
# first PYTHONPATH folder. Without it the tests that select the connector by name fail with vLLM's
# "Unsupported connector type: KVOffloadConnector" (the session of 2026-12-07 lost a command to that).
# Logs under $OUT; the exit status is pytest's. Usage: OUT=... PYTHONPATH=$HOME/site bash benchmarks/gpu_vllm_checks.sh
# [TEST_FILE...] (by default every file holding gpu tests; one command may run 10 minutes, the whole set takes longer)
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
: "${PYTHONPATH:?put the carried vLLM first on PYTHONPATH}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PYTHONPATH:$PWD/src" VLLM_USE_FLASHINFER_SAMPLER=0
PYTHON="${PYTHON:-python3}"  # the GPU machine's interpreter; the test here passes its own
"$PYTHON" - "${PYTHONPATH%%:*}" <<'PY'
import sys, tomllib
from pathlib import Path
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
info = Path(sys.argv[1]) / f"{project['name']}-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
groups = project["entry-points"]
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items()) for group, points in groups.items()))
from importlib.metadata import distributions
written = [ep for dist in distributions(path=[sys.argv[1]]) for ep in dist.entry_points]
plugins = [ep.value for ep in written if ep.group == "vllm.general_plugins"]
assert plugins == ["kvoffload.vllm.plugin:register"], f"entry points read back from {sys.argv[1]}: {written}"
print(f"registered {info}")
PY
# The examples' GPU tests use DOCS_GPU_MODEL (default Qwen/Qwen3-8B, not on the machine): a tiny model unless set.
if [ -z "${DOCS_GPU_MODEL:-}" ]; then
  export DOCS_GPU_MODEL="$OUT/tiny-model"
  "$PYTHON" tests/tiny_model.py "$DOCS_GPU_MODEL" >/dev/null || exit 1
fi
# The files holding gpu tests only: the others may import what the GPU machine lacks (redis-py)
if [ $# -gt 0 ]; then files=("$@"); else mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py tests/docs/test_*.py); fi
"$PYTHON" -m pytest "${files[@]}" -m gpu -q -p no:cacheprovider -rs --durations=15 --junitxml="$OUT/gpu_pytest.xml" 2>&1 | tee "$OUT/gpu_pytest.log"
exit "${PIPESTATUS[0]}"
