"""Which implementation runs a call: ``backend="auto" | "triton" | "torch"``.

Nothing here queries a GPU or imports Triton at import time: the decision is made
per call, from the device of the tensors the caller passed.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ._env import env_flag
from ._warn import warn_once


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set, i.e. Triton kernels run on CPU tensors in numpy."""
    return env_flag("TRITON_INTERPRET")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on tensors living on ``device``.

    ``backend`` is ``"auto"``, ``"triton"`` or ``"torch"``, already checked by the caller.
    """
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but Triton is not installed; `pip install 'triton>=3.6'`")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, for testing); got tensors on {device}"
            )
        return "triton"
    # auto: Triton for CUDA tensors, the vectorised torch path everywhere else (never the interpreter).
    if device.type == "cuda":
        if triton_available():
            return "triton"
        warn_once("no-triton", "wanda_kernels: Triton is not installed, so CUDA tensors use the slower torch path. "
                  "Install it with `pip install 'triton>=3.6'`.")
    return "torch"
