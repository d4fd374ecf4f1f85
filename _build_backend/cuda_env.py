"""Shared by setup.py and the build backend: is there a CUDA compiler to build _C with?"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


def _load_env_module():
    """wanda_kernels/_env.py, loaded by path: importing the package would need torch."""
    path = Path(__file__).resolve().parent.parent / "wanda_kernels" / "_env.py"
    spec = importlib.util.spec_from_file_location("_wanda_kernels_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


env_flag = _load_env_module().env_flag

SKIP_ENV = "WANDA_KERNELS_SKIP_CUDA_BUILD"
ARCHS_ENV = "WANDA_KERNELS_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90"


def find_nvcc() -> str | None:
    """$CUDACXX, then $CUDA_HOME/bin/nvcc (or $CUDA_PATH), then nvcc on PATH."""
    if os.environ.get("CUDACXX") and Path(os.environ["CUDACXX"]).is_file():
        return os.environ["CUDACXX"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            nvcc = Path(os.environ[var]) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc)
    return shutil.which("nvcc")


def skip_reason() -> str | None:
    """Why the CUDA extension is not built, or None when it is."""
    if env_flag(SKIP_ENV):
        return f"{SKIP_ENV}=1 is set"
    if find_nvcc() is None:
        return "no CUDA compiler (nvcc) found on PATH, in $CUDA_HOME or $CUDACXX"
    return None


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get(ARCHS_ENV, DEFAULT_ARCHS).replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not a.rstrip("a").isdigit() or int(a.rstrip("a")) < 80]
    if not archs or bad:
        raise SystemExit(
            f"{ARCHS_ENV}={os.environ.get(ARCHS_ENV)!r}: give compute capabilities of 80 or more, e.g. '80;90' "
            "(2:4 sparse tensor cores need Ampere or later; 'native' is refused: it can silently build sm_75)"
        )
    return archs
