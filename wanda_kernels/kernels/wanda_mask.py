"""Triton kernels that score, select and prune a weight matrix in one pass.

The fp32 score ``|W| * norms`` is computed in registers and never written out. Both
kernels read W once, write the zeros in place (only where pruned) and, on request,
the keep-mask.

Ordering trick: a non-negative fp32 viewed as int32 orders exactly like the float,
so selection works on integer keys (exact, no float compares, NaN ranks highest).
The launchers pass norms through ``abs`` so that no score is ``-0.0``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Largest row the unstructured kernel keeps in registers (next power of two of
# in_features). LLaMA-3-405B's down_proj (53248) fits; longer rows use the torch path.
MAX_UNSTRUCTURED_COLS = 65536


@triton.jit
def wanda_mask_kernel(
    w_ptr,  # (rows, cols) fp16/bf16/fp32/fp64, pruned in place when WRITE_WEIGHT
    norms_ptr,  # (cols,) fp32, contiguous; unused unless USE_NORMS
    row_inv_ptr,  # (rows,) fp32: RIA's 1 / sum_j |W[i, j]|; unused unless RELATIVE
    col_inv_ptr,  # (cols,) fp32: RIA's 1 / sum_i |W[i, j]|; unused unless RELATIVE
    mask_ptr,  # (rows, cols) uint8 (a torch.bool viewed as bytes); unused unless WRITE_MASK
    n_cols,
    k_prune,  # weights to prune per row, 0 <= k_prune < n_cols
    stride_wr,
    stride_wc,
    stride_mr,
    USE_NORMS: tl.constexpr,
    RELATIVE: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per row: exact per-row k-selection by bisection, no sort."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < n_cols
    w_offs = row * stride_wr + cols.to(tl.int64) * stride_wc
    w = tl.load(w_ptr + w_offs, mask=in_row, other=0.0)
    score = tl.abs(w.to(tl.float32))
    if RELATIVE:  # the same products, in the same order, as _torch_impl.score_keys
        score = score * (tl.load(row_inv_ptr + row) + tl.load(col_inv_ptr + cols, mask=in_row, other=0.0))
    if USE_NORMS:
        score = score * tl.load(norms_ptr + cols, mask=in_row, other=0.0)
    key = score.to(tl.int32, bitcast=True)
    # Padding lanes get the largest key: they lie after every real column, so they
    # can never be counted among the k lowest ahead of a real column.
    key = tl.where(in_row, key, 0x7FFFFFFF)

    # Bisection over the 31-bit key range for the k-th smallest key T: the smallest t
    # with count(key <= t) >= k. 31 steps of compare + block reduction, all in
    # registers: one read of the row from memory, unlike a radix pass per digit.
    lo = tl.zeros((), dtype=tl.int32)
    hi = tl.full((), 0x7FFFFFFF, dtype=tl.int32)
    for _ in range(31):
        mid = lo + ((hi - lo) >> 1)
        count = tl.sum((key <= mid).to(tl.int32), axis=0)
        enough = count >= k_prune
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    # Prune every key < T, then the first (k - #below) keys equal to T in column order:
    # the tie rule of a stable ascending sort. k == 0 gives T == 0 and prunes nothing.
    below = key < lo
    tie = key == lo
    n_below = tl.sum(below.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    pruned = (below | (tie & (tie_rank <= k_prune - n_below))) & in_row

    if WRITE_WEIGHT:
        tl.store(w_ptr + w_offs, tl.zeros_like(w), mask=pruned)
    if WRITE_MASK:
        keep = tl.where(pruned, 0, 1).to(tl.uint8)
        tl.store(mask_ptr + row * stride_mr + cols, keep, mask=in_row)


@triton.jit
def wanda_nm_mask_kernel(
    w_ptr,  # (rows, cols) fp16/bf16/fp32/fp64, pruned in place when WRITE_WEIGHT
    norms_ptr,  # (cols,) fp32, contiguous; unused unless USE_NORMS
    row_inv_ptr,  # (rows,) fp32; unused unless RELATIVE
    col_inv_ptr,  # (cols,) fp32; unused unless RELATIVE
    mask_ptr,  # (rows, cols) uint8; unused unless WRITE_MASK
    n_cols,  # multiple of M
    stride_wr,
    stride_wc,
    stride_mr,
    N: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,  # next power of two >= M (Triton block dims are powers of two)
    BLOCK_G: tl.constexpr,  # groups per program
    USE_NORMS: tl.constexpr,
    RELATIVE: tl.constexpr,
    WRITE_WEIGHT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
):
    """Program (row, block of BLOCK_G groups): keep the N best of every M columns."""
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, M_PAD)
    cols = groups[:, None] * M + j[None, :]  # (BLOCK_G, M_PAD)
    valid = (j[None, :] < M) & (cols < n_cols)
    w_offs = row * stride_wr + cols.to(tl.int64) * stride_wc
    w = tl.load(w_ptr + w_offs, mask=valid, other=0.0)
    score = tl.abs(w.to(tl.float32))
    if RELATIVE:
        score = score * (tl.load(row_inv_ptr + row) + tl.load(col_inv_ptr + cols, mask=valid, other=0.0))
    if USE_NORMS:
        score = score * tl.load(norms_ptr + cols, mask=valid, other=0.0)
    # Padding gets key -1, below every real key, so it never outranks a real column.
    key = tl.where(valid, score.to(tl.int32, bitcast=True), -1)

    # rank[g, i] = #{j : key_j > key_i, or key_j == key_i and j < i}: the position of i
    # in a stable descending sort of its group. M <= 32, so the (BLOCK_G, M, M)
    # comparison cube stays small and needs no sort network.
    k_i = key[:, :, None]
    k_j = key[:, None, :]
    j_before_i = j[None, None, :] < j[None, :, None]
    beats = (k_j > k_i) | ((k_j == k_i) & j_before_i)
    rank = tl.sum(beats.to(tl.int32), axis=2)
    keep = rank < N

    if WRITE_WEIGHT:
        tl.store(w_ptr + w_offs, tl.zeros_like(w), mask=valid & (rank >= N))
    if WRITE_MASK:
        tl.store(mask_ptr + row * stride_mr + cols, keep.to(tl.uint8), mask=valid)


def _num_warps(block_n: int) -> int:
    # 128 keys per thread (one warp for a 4096-column row). Each of the 31 bisection
    # steps ends in a block-wide reduction, whose barrier costs more the more warps
    # share it; fewer warps per row also let more rows run per SM. Measured on an H100
    # (benchmarks/tune_mask.py, results/h100/round2): 1.08-1.9x faster than 16 keys per
    # thread at LLaMA row lengths (4096 to 28672 columns), and the best variant at each.
    return int(min(32, max(1, block_n // (32 * 128))))


def launch_wanda_mask(
    weight: torch.Tensor,
    norms32: torch.Tensor | None,
    *,
    k_prune: int | None = None,
    nm: tuple[int, int] | None = None,
    write_weight: bool,
    mask: torch.Tensor | None,
    relative: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the unstructured (``k_prune``) or N:M (``nm``) kernel. No validation here.

    Args:
        weight: ``(rows, cols)`` floating, CUDA (or CPU under ``TRITON_INTERPRET=1``),
            any strides; pruned in place when ``write_weight``.
        norms32: ``(cols,)`` fp32 contiguous on ``weight.device``, or None (magnitude).
        relative: RIA's ``(row_inv (rows,), col_inv (cols,))`` fp32 contiguous on
            ``weight.device`` (:func:`wanda_kernels._torch_impl.relative_terms`), or None.
        mask: ``(rows, cols)`` contiguous bool to receive the keep-mask, or None.
    """
    rows, cols = weight.shape
    if rows == 0 or cols == 0:
        return
    use_norms = norms32 is not None
    norms_arg = norms32 if use_norms else weight  # never read when USE_NORMS is False
    row_inv, col_inv = relative if relative is not None else (weight, weight)  # never read unless RELATIVE
    mask_arg = mask.view(torch.uint8) if mask is not None else weight
    stride_mr = mask.stride(0) if mask is not None else 0
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        if nm is None:
            block_n = triton.next_power_of_2(cols)
            wanda_mask_kernel[(rows,)](
                weight, norms_arg, row_inv, col_inv, mask_arg, cols, k_prune,
                weight.stride(0), weight.stride(1), stride_mr,
                USE_NORMS=use_norms, RELATIVE=relative is not None, WRITE_WEIGHT=write_weight,
                WRITE_MASK=mask is not None,
                BLOCK_N=block_n, num_warps=_num_warps(block_n),
            )
        else:
            n, m = nm
            m_pad = triton.next_power_of_2(m)
            # ~2048 pairwise compares per program whatever M is; capped by the row length.
            # (H100, tune_mask.py: 128 groups for 2:4, 32 for 4:8, within 5% of the best.)
            block_g = min(max(1, 2048 // (m_pad * m_pad)), triton.next_power_of_2(cols // m))
            grid = (rows, triton.cdiv(cols // m, block_g))
            wanda_nm_mask_kernel[grid](
                weight, norms_arg, row_inv, col_inv, mask_arg, cols,
                weight.stride(0), weight.stride(1), stride_mr,
                N=n, M=m, M_PAD=m_pad, BLOCK_G=block_g,
                USE_NORMS=use_norms, RELATIVE=relative is not None, WRITE_WEIGHT=write_weight,
                WRITE_MASK=mask is not None,
                num_warps=2 if m_pad <= 4 else 4,
            )

