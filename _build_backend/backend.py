"""PEP 517 backend: setuptools, plus the CUDA build requirements only when _C will be built.

On a machine without nvcc (or with WANDA_KERNELS_SKIP_CUDA_BUILD=1) `pip install .`
needs nothing beyond setuptools; with nvcc it also gets pybind11, ninja, the
nvidia-cutlass headers (unless CUTLASS_HOME points at a checkout) and, if the
machine has none, cmake.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the standard hooks)

from cuda_env import skip_reason


def _cmake_ok() -> bool:
    cmake = shutil.which("cmake")
    if cmake is None:
        return False
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
        major, minor = (int(v) for v in out.split()[2].split(".")[:2])
        return (major, minor) >= (3, 24)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return False


def _cuda_requires() -> list[str]:
    if skip_reason() is not None:
        return []
    reqs = ["pybind11>=2.12", "ninja"]
    if not os.environ.get("CUTLASS_HOME"):
        reqs.append("nvidia-cutlass==4.2.0.0")
    if not _cmake_ok():
        reqs.append("cmake>=3.24")
    return reqs


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cuda_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cuda_requires()
