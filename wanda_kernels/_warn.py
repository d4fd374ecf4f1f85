"""Warnings attributed to the user's code, each said once.

A warning raised deep inside a call (a custom op, a module's forward, a hook) would
otherwise point at a line of torch or of this package. :func:`warn_once` names the first
frame outside them (and outside transformers and accelerate, whose modules call ours),
so the user sees which of their lines triggered it, and says each message (by key) once
per process.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_once", "warn_external", "forget"]

# Top-level packages whose frames are not the user's code.
_INTERNAL = frozenset({"wanda_kernels", "torch", "transformers", "accelerate"})
_said: set[str] = set()


def _internal(frame) -> bool:
    return frame.f_globals.get("__name__", "").partition(".")[0] in _INTERNAL


def warn_external(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside wanda_kernels, torch and transformers."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> bool:
    """:func:`warn_external` unless ``key`` was warned about before; True when it warned now."""
    if key in _said:
        return False
    _said.add(key)
    warn_external(message, category)
    return True


def forget(key: str | None = None) -> None:
    """Let ``key`` (every key, with None) be warned about again; for tests."""
    if key is None:
        _said.clear()
    else:
        _said.discard(key)
