"""The vectorised torch path: the CPU implementation (and the fallback on any device).

Same results as :mod:`wanda_kernels.reference`, bit for bit, by different means:

* scores are ordered through their fp32 bit patterns viewed as int32. For non-negative
  floats that order is the float order, so selection is exact integer work;
* unstructured rows use ``kthvalue`` (a selection, O(cols)) plus a tie pass by index
  instead of a full sort;
* N:M groups append the column to the key, which makes keys unique and turns the
  tie rule of a stable descending sort into a plain ``topk``.

Work is split into row chunks so that temporaries stay within a fixed budget.
"""

from __future__ import annotations

import torch

# Elements per chunk of temporaries (fp32 scores, int64 cumsums and composite keys).
_CHUNK_ELEMENTS = 1 << 23


def relative_terms(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RIA's relative-importance factors: ``(1 / sum_j |W[i, j]|  (rows,), 1 / sum_i |W[i, j]|  (cols,))``.

    fp32 on the weight's device; an all-zero row or column gets 0 (its scores are all 0
    anyway). Both backends take them from here, so their scores are the same bits.
    """
    absw = weight.abs().float()
    row, col = absw.sum(dim=1), absw.sum(dim=0)
    return (torch.where(row > 0, 1.0 / row, torch.zeros_like(row)).contiguous(),
            torch.where(col > 0, 1.0 / col, torch.zeros_like(col)).contiguous())


def score_keys(weight: torch.Tensor, norms32: torch.Tensor | None,
               relative: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """int32 keys whose order is the order of the fp32 scores.

    ``|W| * norms`` (Wanda), ``|W|`` (magnitude, ``norms32`` None), or with ``relative =
    (row_inv (rows,), col_inv (cols,))`` RIA's ``|W| * (row_inv[i] + col_inv[j]) * norms``
    (``norms32`` then holds ``||X_j||^a``). The Triton kernels compute the same products in
    the same order.
    """
    score = weight.abs().float()
    if relative is not None:
        score = score * (relative[0][:, None] + relative[1][None, :])
    if norms32 is not None:
        score = score * norms32[None, :]
    return score.view(torch.int32)


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def select_lowest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``(rows, cols)``: True at the ``k`` lowest keys of each row, ties by lower index."""
    rows, cols = keys.shape
    if k == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=keys.device)
    kth = keys.kthvalue(k, dim=1, keepdim=True).values
    below = keys < kth
    tie = keys == kth
    missing = k - below.sum(dim=1, keepdim=True)  # how many ties of the k-th key to take
    return below | (tie & (tie.cumsum(dim=1) <= missing))


def _rows(relative, lo: int, hi: int):
    return None if relative is None else (relative[0][lo:hi], relative[1])


def keep_unstructured(weight: torch.Tensor, norms32: torch.Tensor | None, k: int, relative=None) -> torch.Tensor:
    """Per-row keep-mask pruning ``k`` weights of each row."""
    rows, cols = weight.shape
    keep = torch.empty(rows, cols, dtype=torch.bool, device=weight.device)
    for lo, hi in _row_chunks(rows, cols * 3):
        keep[lo:hi] = ~select_lowest(score_keys(weight[lo:hi], norms32, _rows(relative, lo, hi)), k)
    return keep


def keep_layer(weight: torch.Tensor, norms32: torch.Tensor | None, k: int, relative=None) -> torch.Tensor:
    """Per-layer keep-mask pruning the ``k`` lowest scores of the whole matrix."""
    keys = score_keys(weight, norms32, relative).reshape(-1)
    keep = torch.ones_like(keys, dtype=torch.bool)
    if k > 0:
        kth = keys.kthvalue(k).values
        below = keys < kth
        missing = k - int(below.sum())
        keep &= ~below
        # Ties of the k-th key: the lowest flat indices go first. Few in practice, so
        # index them instead of a cumsum over the whole matrix.
        tie_idx = (keys == kth).nonzero().squeeze(1)[:missing]
        keep[tie_idx] = False
    return keep.reshape(weight.shape)


def keep_nm(weight: torch.Tensor, norms32: torch.Tensor | None, n: int, m: int, relative=None) -> torch.Tensor:
    """N:M keep-mask: the ``n`` largest composite keys of every group of ``m``.

    The composite ``key << 5 | (31 - j)`` (``j < m <= 32``, the column within the
    group) is unique within a group and orders by score first, then lower column
    first: exactly the order of a stable descending sort. With no ties left,
    ``topk`` is deterministic, and its n-th value is the group's threshold.
    """
    rows, cols = weight.shape
    tiebreak = 31 - torch.arange(m, device=weight.device, dtype=torch.int64)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=weight.device)
    for lo, hi in _row_chunks(rows, cols * 4):
        keys = score_keys(weight[lo:hi], norms32, _rows(relative, lo, hi)).to(torch.int64)
        keys = keys.reshape(hi - lo, cols // m, m)
        composite = (keys << 5) | tiebreak
        nth_best = composite.topk(n, dim=-1).values[..., n - 1 :]
        keep[lo:hi] = (composite >= nth_best).reshape(hi - lo, cols)
    return keep


def accumulate_sq_norms_(sq_norms: torch.Tensor, x2d: torch.Tensor) -> None:
    """``sq_norms += (x2d.float() ** 2).sum(0)`` in token chunks, fp32 accumulation."""
    tokens, cols = x2d.shape
    for lo, hi in _row_chunks(tokens, cols):
        xf = x2d[lo:hi].float()
        sq_norms.add_((xf * xf).sum(dim=0))
