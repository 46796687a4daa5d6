"""Builds the package. The optional CUDA helper (kernels/managed_alloc.cu, CUDA
managed memory for the paged optimizers) is compiled with nvcc only when asked:

    QLORA_TRITON_BUILD_CUDA=1 pip install --no-build-isolation -e .

No hardware probing at install time: without the variable nothing native is
built and the package is pure Python (paged optimizers then need paged=False
on CUDA). NVCC overrides the compiler path. The library is written next to the
Python sources (qlora_triton/_managed_alloc.so) so editable installs find it,
and shipped as package data in wheels.
"""

import os
import shutil
import subprocess
from pathlib import Path

import setuptools
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
HELPER_SOURCE = ROOT / "kernels" / "managed_alloc.cu"
HELPER_LIBRARY = ROOT / "qlora_triton" / "_managed_alloc.so"


def build_cuda_helper() -> None:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("QLORA_TRITON_BUILD_CUDA=1 but nvcc was not found: put it on PATH or set NVCC")
    cmd = [nvcc, "-O2", "-shared", "-Xcompiler", "-fPIC", "-o", str(HELPER_LIBRARY), str(HELPER_SOURCE)]
    print("building the CUDA managed-memory helper:", " ".join(cmd))
    subprocess.run(cmd, check=True)


def license_metadata() -> dict:
    """Apache-2.0 (the text is LICENSE, which setuptools ships by its default
    pattern) as an SPDX ``License-Expression`` where setuptools has it (>= 77),
    the older free-text field before. A TOML table in pyproject.toml would be
    the one form both read, but setuptools drops it after 2027-02-18, and the
    GPU machine builds with its own setuptools (--no-build-isolation)."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


class BuildPyWithCudaHelper(build_py):
    def run(self):
        if os.environ.get("QLORA_TRITON_BUILD_CUDA", "0") not in ("", "0"):
            build_cuda_helper()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithCudaHelper},
    package_data={"qlora_triton": ["_managed_alloc.so"]},
    **license_metadata(),
)
