"""Optional progress bars: tqdm where it is installed and wanted, the plain iterable otherwise."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["progress_bar"]


def progress_bar(items: Iterable, enabled: bool, desc: str, unit: str = "layer") -> Iterable:
    """``items`` wrapped in a tqdm bar (cleared when done) when ``enabled`` and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)
