"""SparseGPT (Frantar & Alistarh, 2023): prune with an OBS weight update, the paper's baseline.

Columns are processed left to right in blocks of 128; inside a block each pruned
weight's error is spread over the not-yet-processed columns through the inverse
Hessian ``H = X^T X`` (1% dampening). Mask selection uses ``w^2 / [H^-1]_jj^2``.
Comparison group as Wanda: each output row, so every row reaches exactly
``floor(s * in_features)`` zeros (each block prunes its share of the running
count); N:M picks the N best of every M columns as the block reaches them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._validation import num_pruned

__all__ = ["sparsegpt_prune_", "collect_hessians"]


@torch.no_grad()
def collect_hessians(linears: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``{name: X^T X}``: fp64 ``(in, in)`` sums over every token each linear sees while ``run()`` runs.

    Each forward call's ``X^T X`` is computed in fp32 and added to an fp64 sum: exact for
    any order of the calls unless an entry's terms span more than about ``2**(29 - log2
    calls)``, so calibration split over processes sums to the same bits (see
    :mod:`.distributed`).
    """
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    # (the input tensor, its version, its X^T X): layers that read the same input share the product
    last: list = [None, -1, None]

    for name, mod in linears.items():
        def hook(module, args, name=name):
            x_in = args[0]
            if last[0] is not x_in or last[1] != x_in._version:  # q/k/v (gate/up) get the same tensor in turn
                x = x_in.reshape(-1, x_in.shape[-1]).float()
                # fp32 product, widened once: a same-dtype add is faster on a CPU than a mixed one, same bits
                last[:] = [x_in, x_in._version, (x.t() @ x).double()]
            h = hessians.get(name)
            hessians[name] = last[2].clone() if h is None else h.add_(last[2])
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    return hessians


@torch.no_grad()
def sparsegpt_prune_(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
                     nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01) -> None:
    """Prune ``weight`` in place with SparseGPT.

    Args:
        weight: ``(out, in)`` floating, any device/strides (a ``.t()`` view works).
        hessian: ``(in, in)`` fp32 or fp64 ``sum_t x_t x_t^T`` (any positive scale) on the same
            device; the solve runs in fp32.
        sparsity: fraction per row (ignored with ``nm``).
        nm: ``(N, M)`` to keep N of every M, or None for unstructured.
    """
    rows, cols = weight.shape
    W = weight.float().clone()
    H = hessian.to(torch.float32, copy=True)
    dead = torch.diag(H) == 0  # inputs never active: any value works, keep H invertible
    H[dead, dead] = 1.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    # Upper Cholesky factor of H^-1: row i holds the update of the later columns.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)  # True = pruned
    if nm is not None:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # N:M groups never straddle two blocks

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            k = num_pruned(i2, sparsity) - num_pruned(i1, sparsity)  # this block's share, per row
            if k > 0:
                score = W1**2 / d[None, :] ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
                mask[:, i1:i2].scatter_(1, idx, True)
        for i in range(i2 - i1):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
                mask[:, col : col + m].scatter_(1, idx, True)
            w = W1[:, i]
            q = w.masked_fill(mask[:, col], 0.0)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0.0
    weight.copy_(W.to(weight.dtype))
