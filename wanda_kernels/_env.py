"""Environment switches: the one rule for reading a yes/no environment variable, and the cache folder.

Standard library only, so that the build (``_build_backend/cuda_env.py``) and the tests'
``conftest.py`` can load this file before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

TRUTHY = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool = False) -> bool:
    """Whether environment variable ``name`` is set to 1/true/yes/on (any case); ``default`` when unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in TRUTHY


def cache_root() -> Path:
    """Where converted models, unpacked data and kept builds live: $WANDA_KERNELS_CACHE or ~/.cache/wanda_kernels."""
    return Path(os.environ.get("WANDA_KERNELS_CACHE") or Path.home() / ".cache" / "wanda_kernels")
