"""Loading the compiled extension ``wanda_kernels._C`` (the CUTLASS 2:4 GEMMs) and what it was built for.

Imported lazily, on the first call that wants it; never at ``import wanda_kernels``.
Importing it initialises nothing on the GPU (its CUDA runtime is static and lazy).
"""

from __future__ import annotations

import functools

__all__ = ["extension", "extension_error", "built_archs", "runs_on", "sm90_built"]

BUILD_HINT = (
    "build it with `pip install .` from a checkout on a machine with nvcc on PATH (CUDA 11.8 or later for the "
    "sm80 kernel, 12.0 or later for the Hopper kernels); WANDA_KERNELS_CUDA_ARCHS picks the GPUs (default '80;90')"
)


# The version of _C's Python interface this package calls (csrc/bindings.cpp's
# interface_version; builds before it had none: 1). A _C left over from older sources
# would be called with the wrong arguments.
INTERFACE_VERSION = 2


@functools.cache
def _load():
    try:
        from .. import _C  # noqa: PLC0415
    except ImportError as exc:
        return None, f"the extension wanda_kernels._C is not built ({exc}); {BUILD_HINT}"
    found = getattr(_C, "interface_version", 1)
    if found != INTERFACE_VERSION:
        return None, (f"the extension wanda_kernels._C at {_C.__file__} was built from other sources (interface "
                      f"version {found}, this package needs {INTERFACE_VERSION}); rebuild it: {BUILD_HINT}")
    return _C, None


def extension():
    """The ``_C`` module, or None when it is not built."""
    return _load()[0]


def extension_error() -> str | None:
    """Why ``_C`` is unavailable (with how to build it), or None when it loaded."""
    return _load()[1]


def built_archs() -> list[int]:
    """Compute capabilities (e.g. ``[80, 90]``) that ``_C`` has kernels for; [] without ``_C``.

    ``_C.cuda_archs`` lists the sm80 kernel's architectures, plus ``90a`` when the
    Hopper kernels are built.
    """
    mod = extension()
    if mod is None:
        return []
    return sorted({int(a.strip().rstrip("a")) for a in str(mod.cuda_archs).split(",") if a.strip()})


def runs_on(major: int, minor: int) -> bool:
    """Whether ``_C``'s machine code runs on a GPU of compute capability ``major.minor``.

    sm_XY code runs on X.Z for Z >= Y (same major version) only.
    """
    return any(a // 10 == major and a % 10 <= minor for a in built_archs())


def sm90_built() -> bool:
    """Whether ``_C`` holds the Hopper (sm90a, sparse wgmma) kernels."""
    mod = extension()
    return bool(mod is not None and mod.sm90_built())
