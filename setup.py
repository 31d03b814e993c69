"""Build hook next to pyproject.toml: adds the CUDA copy kernels when they can be built, nothing else.

The extension is compiled only when torch with CUDA and nvcc are importable/findable at build time (i.e.
``pip install --no-build-isolation .`` in a CUDA environment). Everywhere else, including isolated builds
that do not have torch, this is a plain pure-Python build, and ``kvoffload.transfer.cuda`` JIT-compiles
the same sources on first use or the torch copy path is used.
"""

from __future__ import annotations

from typing import Any

from setuptools import setup


def cuda_extension() -> dict[str, Any]:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    extension = CUDAExtension("kvoffload._kvcopy", ["csrc/bindings.cpp", "csrc/kv_copy_kernels.cu"],
                              extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
