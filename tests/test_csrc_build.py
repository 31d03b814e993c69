"""The CUDA sources compile on a machine without a GPU, so a broken kernel is caught before the GPU run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cu_compiles_with_nvcc_alone(source: Path, tmp_path: Path) -> None:
    result = subprocess.run([NVCC, "-c", "-O3", "-arch=sm_90", "-Werror", "all-warnings", "-o",
                             str(tmp_path / "kernels.o"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernels.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="nvcc or g++ not found")
def test_binding_compiles(tmp_path: Path) -> None:
    """bindings.cpp needs only pybind11 (shipped in torch's include dir), Python and the CUDA runtime headers."""
    torch = pytest.importorskip("torch")
    cuda_include = Path(NVCC).resolve().parents[1] / "include"
    if not (cuda_include / "cuda_runtime.h").is_file():
        cuda_include = Path("/usr/local/cuda/include")
    result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DTORCH_EXTENSION_NAME=kvo",
                             f"-I{Path(torch.__file__).parent / 'include'}", f"-I{sysconfig.get_paths()['include']}",
                             f"-I{cuda_include}", str(CSRC / "bindings.cpp")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
