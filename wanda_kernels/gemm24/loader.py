"""Loading the compiled extension ``wanda_kernels._C`` (the CUTLASS 2:4 GEMMs) and what it was built for.

Imported lazily, on the first call that wants it; never at ``import wanda_kernels``.
Importing it initialises nothing on the GPU (its CUDA runtime is static and lazy).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path

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
        return None, _source_tree_message() or f"the extension wanda_kernels._C is not built ({exc}); {BUILD_HINT}"
    found = getattr(_C, "interface_version", 1)
    if found != INTERFACE_VERSION:
        return None, (f"the extension wanda_kernels._C at {_C.__file__} was built from other sources (interface "
                      f"version {found}, this package needs {INTERFACE_VERSION}); rebuild it: {BUILD_HINT}")
    return _C, None


def _distributions() -> list:
    """Every installed ``wanda-kernels`` distribution on ``sys.path`` (a checkout's ``*.egg-info`` included)."""
    return [d for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().replace("_", "-") == "wanda-kernels"]


def _installed_extension(dists: list) -> Path | None:
    """The ``_C`` file that one of ``dists`` (installed ``wanda-kernels`` distributions) holds, if any."""
    for dist in dists:
        for file in dist.files or []:
            if file.parent.name == "wanda_kernels" and file.name.startswith("_C.") and file.suffix in (".so", ".pyd"):
                return Path(file.locate()).resolve()
    return None


def _editable_install_of(root: Path, dists: list) -> bool:
    """Whether one of ``dists`` is an editable install (``pip install -e``) of ``root``."""
    for dist in dists:
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = info.get("url", "")
        if info.get("dir_info", {}).get("editable") and url.startswith("file://") and \
                Path(url[len("file://"):]).resolve() == root:
            return True
    return False


def _source_tree_message(package: Path | None = None) -> str | None:
    """Why ``_C`` is missing when Python imported a checkout's source tree instead of the installed copy.

    Running Python from the checkout's root puts the source tree first on ``sys.path``,
    and it has no ``_C`` unless built in place.
    """
    package = package or Path(__file__).resolve().parents[1]
    root = package.parent
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return None
    dists = _distributions()
    if _editable_install_of(root, dists):
        return None
    installed = _installed_extension(dists)
    elsewhere = f"; the installed copy has it ({installed})" if installed and installed.parent != package else ""
    return (f"the extension wanda_kernels._C is not built in the source tree at {root}, which is what Python is "
            f"importing (Python was started in the checkout, or it is on PYTHONPATH){elsewhere}: run from another "
            "directory, or `pip install -e .` there to build _C in place")


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
