"""OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity"): a sparsity for each decoder layer.

A decoder layer that holds more outliers among its Wanda scores ``|W_ij| * ||X_j||``
(scores above ``m`` times the layer's mean score, over all its linear layers) keeps
more of its weights. The outlier ratios ``D_l`` are scaled linearly onto ``[0, 2λ]``
and each layer's sparsity is ``s - (scaled_l - mean)``, the mean weighted by the
layers' sizes: the model as a whole keeps exactly the target ``s`` (before each row's
floor), and no layer moves more than ``2λ`` from it (``λ`` in the paper's notation,
0.08 by default; ``m`` = 5).

This module holds the arithmetic; :func:`wanda_kernels.llm.pipeline.prune_model`
(``owl=True``) measures the ratios in a calibration pass over the dense layers.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_LAMBDA", "DEFAULT_M", "check_owl", "outlier_ratio", "layer_sparsities"]

DEFAULT_LAMBDA = 0.08
DEFAULT_M = 5.0


def check_owl(sparsity: float, lam, m) -> None:
    """ValueError unless ``m > 0`` and ``lam >= 0`` keeps every layer in ``[0, 1)`` (``2 lam <= s < 1 - 2 lam``)."""
    for name, value in (("owl_lambda", lam), ("owl_m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    if m <= 0:
        raise ValueError(f"owl_m (outliers are scores above owl_m x the layer's mean) must be > 0; got {m!r}")
    if lam < 0 or 2 * lam > sparsity or sparsity + 2 * lam >= 1:
        raise ValueError(f"owl_lambda must be in [0, {min(sparsity / 2, (1 - sparsity) / 2):g}) at sparsity "
                         f"{sparsity:g}: layers' sparsities span sparsity +- 2 x owl_lambda, which must stay in "
                         f"[0, 1); got {lam!r}")


@torch.no_grad()
def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The share of all ``scores`` (one decoder layer's Wanda scores, any shapes) above ``m`` x their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(s.double().sum() for s in scores) / total
    above = sum((s.double() > m * mean).sum() for s in scores)
    return float(above) / total


def layer_sparsities(ratios: list[float], sparsity: float, lam: float, sizes: list[int] | None = None) -> list[float]:
    """Each layer's sparsity from its outlier ratio: more outliers, fewer weights pruned.

    Args:
        ratios: ``D_l`` per decoder layer.
        sparsity: the target ``s`` for the model.
        lam: the spread ``λ``: the scaled ratios span ``[0, 2λ]``.
        sizes: weights per layer (default: equal), for the mean.

    Returns:
        ``s_l`` per layer with ``sum(sizes * s_l) / sum(sizes) == s`` (to rounding) and
        ``max - min == 2λ`` unless all ratios are equal (then every ``s_l == s``).
    """
    sizes = sizes or [1] * len(ratios)
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [float(sparsity)] * len(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(n * x for n, x in zip(sizes, scaled)) / sum(sizes)
    return [sparsity - (x - mean) for x in scaled]
