"""examples/production-stack/Dockerfile, the engine image of the Helm values files, checked without Docker.

The CI runner has the docker client but no Docker daemon (and no network to pull ``vllm/vllm-openai``), so the
image itself is not built here. What is checked: the wheel the Dockerfile copies builds from the checkout
(``pip wheel --no-deps``, the command docs/deployment.md shows) and holds the connector; the image name and tag
of both values files are those the deployment page tells users to build and push; the Dockerfile's vLLM
release is one kvoffload's compatibility check accepts, and the tag names it and kvoffload's version.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

pytestmark = pytest.mark.docs

STACK = ROOT / "examples" / "production-stack"
DOCKERFILE = STACK / "Dockerfile"


def _dockerfile() -> tuple[str, str]:
    """(default VLLM_VERSION, the FROM line)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M)
    base = re.search(r"^FROM (\S+)$", text, re.M)
    assert version and base, "the Dockerfile needs ARG VLLM_VERSION=… and one FROM line"
    return version.group(1), base.group(1)


def _built_images() -> set[str]:
    """The image names the deployment page builds (docker build -t) and pushes (docker push)."""
    page = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    built = set(re.findall(r"docker build -f examples/production-stack/Dockerfile -t (\S+) \.", page))
    pushed = set(re.findall(r"docker push (\S+)", page))
    assert built and built == pushed, (built, pushed)
    return built


def test_dockerfile_vllm_release_is_supported():
    from kvoffload.vllm import compat

    version, base = _dockerfile()
    assert base == "vllm/vllm-openai:v${VLLM_VERSION}"
    low, high = compat.SUPPORTED
    assert low <= compat.release(version) <= high, f"vLLM {version} is outside {compat.SUPPORTED}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "COPY dist/kvoffload-*.whl" in text and "compat.check()" in text


def test_values_files_use_the_image_the_docs_build():
    version, _ = _dockerfile()
    kvoffload_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    expected_tag = f"{kvoffload_version}-vllm{version}"
    images = _built_images()
    assert images == {f"ghcr.io/example/vllm-openai-kvoffload:{expected_tag}"}, images
    for name in ("values-kvoffload.yaml", "values-kvoffload-shared.yaml"):
        spec = yaml.safe_load((STACK / name).read_text())["servingEngineSpec"]["modelSpec"][0]
        assert f"{spec['repository']}:{spec['tag']}" in images, name
    # The shared values file uses a Valkey tier: the image installs the redis extra.
    assert "[redis]" in DOCKERFILE.read_text(encoding="utf-8")


def test_the_wheel_the_dockerfile_copies_builds(tmp_path):
    """``pip wheel --no-deps -w dist .`` in a copy of the checkout: one pure-Python wheel, with the connector
    and the vLLM plugin entry point, whose name matches the Dockerfile's ``COPY dist/kvoffload-*.whl``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    checkout = tmp_path / "checkout"
    for name in files:
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes((ROOT / name).read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", "dist", "."], cwd=checkout,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list((checkout / "dist").glob("kvoffload-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        assert "kvoffload/vllm/connector.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "vllm.general_plugins" in wheel.read(entry_points).decode()
