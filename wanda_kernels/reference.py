"""Plain-torch twins of every op in wanda_kernels.

These functions *define* the semantics the fast paths must reproduce, and they are
the oracle of the test suite. They are written for clarity, not speed: sorts where
the kernels select, loops where the kernels vectorise. They do no input validation
beyond what torch does; the public API in :mod:`wanda_kernels` validates.

Semantics (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for
Large Language Models"):

* score ``S[i, j] = |W[i, j]| * ||X_j||_2`` computed in fp32 (``metric="wanda"``),
  or ``S[i, j] = |W[i, j]|`` (``metric="magnitude"``).
* unstructured, per row: every output row prunes exactly ``num_pruned(in, s)``
  weights, those with the lowest scores. Ties are broken by column index: among
  equal scores the lower column is pruned first (the order a stable ascending sort
  gives).
* N:M: in every group of M consecutive columns of a row the N highest scores are
  kept. Ties keep the lower column index.
* per layer (the magnitude baseline of the paper): one threshold over the whole
  matrix; ``num_pruned(out * in, s)`` weights are pruned, ties broken by the
  row-major flat index.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = [
    "num_pruned",
    "wanda_score",
    "magnitude_score",
    "unstructured_mask",
    "nm_mask",
    "layer_mask",
    "keep_mask",
    "prune",
    "accumulate_sq_norms",
]


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a comparison group prunes: ``floor(sparsity * numel)``.

    The product is taken in exact decimal arithmetic of the sparsity as Python prints
    it, so ``num_pruned(100, 0.29) == 29`` even though ``0.29 * 100`` is
    ``28.999999999999996`` in binary floating point.
    """
    return math.floor(Fraction(repr(float(sparsity))) * numel)


def wanda_score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W| * norms[None, :]`` in fp32.

    Args:
        weight: ``(out_features, in_features)``, any floating dtype, any device.
        norms: ``(in_features,)``, ``||X_j||_2`` per input feature, same device.

    Returns:
        ``(out_features, in_features)`` fp32 on ``weight.device``.
    """
    return weight.abs().float() * norms.float()[None, :]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score ``|W|`` in fp32, shape and device of ``weight``."""
    return weight.abs().float()


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row keep-mask: prune the ``num_pruned(in, sparsity)`` lowest scores of every row.

    Args:
        score: ``(rows, cols)`` floating scores.
        sparsity: fraction in ``[0, 1)``.

    Returns:
        ``(rows, cols)`` bool, True = kept.
    """
    k = num_pruned(score.shape[1], sparsity)
    order = torch.sort(score, dim=1, stable=True).indices  # ascending, ties by index
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: the ``n`` highest scores of every ``m`` consecutive columns of a row.

    Args:
        score: ``(rows, cols)`` floating scores, ``cols % m == 0``.
        n, m: ``1 <= n < m``.

    Returns:
        ``(rows, cols)`` bool, True = kept; exactly ``n`` True per group.
    """
    rows, cols = score.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    for start in range(0, cols, m):
        group = score[:, start : start + m]
        # A stable descending sort keeps the lower index first among equal scores.
        best = torch.sort(group, dim=1, descending=True, stable=True).indices[:, :n]
        keep[:, start : start + m].scatter_(1, best, True)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-layer keep-mask: one threshold over the whole matrix (the paper's magnitude baseline).

    Prunes the ``num_pruned(score.numel(), sparsity)`` lowest scores of the flattened
    (row-major) matrix, ties broken by flat index. Returns bool of ``score.shape``.
    """
    flat = score.reshape(1, -1)
    return unstructured_mask(flat, sparsity).reshape(score.shape)


def keep_mask(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    sparsity: float = 0.5,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    scope: str = "row",
) -> torch.Tensor:
    """Reference keep-mask of :func:`wanda_kernels.prune_mask` (same arguments, no checks).

    ``pattern`` is ``"unstructured"`` or ``"N:M"``; with N:M, ``sparsity`` is ignored.
    """
    score = magnitude_score(weight) if metric == "magnitude" else wanda_score(weight, norms)
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        return nm_mask(score, n, m)
    if scope == "layer":
        return layer_mask(score, sparsity)
    return unstructured_mask(score, sparsity)


def prune(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    sparsity: float = 0.5,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    scope: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`wanda_kernels.prune_`, out of place.

    Returns ``(pruned_weight, keep)``: a copy of ``weight`` with pruned entries set to
    zero, and the bool keep-mask.
    """
    keep = keep_mask(weight, norms, sparsity, pattern=pattern, metric=metric, scope=scope)
    return weight.masked_fill(~keep, 0), keep


def accumulate_sq_norms(sq_norms: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`wanda_kernels.accumulate_sq_norms_`, out of place, in fp64.

    Args:
        sq_norms: ``(in_features,)`` running sums.
        x: ``(..., in_features)`` activations.

    Returns:
        ``(in_features,)`` fp64: ``sq_norms + sum over all tokens of x**2``.
    """
    x64 = x.double().reshape(-1, x.shape[-1])
    return sq_norms.double() + (x64 * x64).sum(dim=0)
