"""Fused Triton kernel: Wanda 2:4 selection straight into CUTLASS's compressed format.

One pass over W: score, keep the 2 best of every 4, and write the kept values
``(M, K/2)`` and the int16 metadata in the sm80 layout ``(M, K/16)`` or the sm90 layout,
never a dense masked copy.
The output equals ``prune_(W, norms, pattern="2:4")`` followed by ``compress_24(W)``
bit for bit (see ``wanda_kernels._layout24`` for the format).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BLOCK_E = 64  # metadata elements (16 weights each) per program


@triton.jit
def prune_compress_24_kernel(
    w_ptr,  # (M, K) fp16/bf16, any strides
    norms_ptr,  # (K,) fp32; unused unless USE_NORMS
    values_ptr,  # (M, K/2) contiguous, viewed as int16
    meta_ptr,  # int16, contiguous: (M, K/16) reordered (sm80), or (M64, K128/16) (sm90)
    n_rows,  # M, multiple of 32
    e_rows,  # round_up(M, 64): rows of the sm90 layout
    n_cols,  # K, multiple of 64
    stride_wr,
    stride_wc,
    USE_NORMS: tl.constexpr,
    META_SM90: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Each program handles BLOCK_E metadata elements e = row * (K/16) + col: 4 groups
    # (t) of 4 weights (j) each, as a (BLOCK_E, 4, 4) tile.
    meta_cols = n_cols // 16
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < n_rows * meta_cols
    row = e // meta_cols
    mcol = e % meta_cols
    t = tl.arange(0, 4)
    j = tl.arange(0, 4)
    t2 = t[None, :]
    j3 = j[None, None, :]
    col = mcol[:, None, None] * 16 + t[None, :, None] * 4 + j3  # (BLOCK_E, 4, 4)
    ok3 = e_ok[:, None, None] & (col < n_cols)
    w = tl.load(w_ptr + row[:, None, None] * stride_wr + col * stride_wc, mask=ok3, other=0.0)
    score = tl.abs(w.to(tl.float32))
    if USE_NORMS:
        score = score * tl.load(norms_ptr + col, mask=ok3, other=0.0)
    key = score.to(tl.int32, bitcast=True)  # non-negative floats order like their bits

    # Rank within each group of 4 (stable descending: ties keep the lower index).
    rank = tl.zeros((BLOCK_E, 4, 4), dtype=tl.int32)
    for jj in tl.static_range(4):
        k_jj = tl.sum(tl.where(j3 == jj, key, 0), axis=2)[:, :, None]
        rank += ((k_jj > key) | ((k_jj == key) & (jj < j3))).to(tl.int32)
    keep = rank < 2

    # The stored pair, exactly as compress_24 derives it from the pruned dense weight
    # (_layout24.stored_pair): the non-zero kept positions, filled up with 2, then 3.
    # Compare in fp32: the interpreter holds bf16 as raw uint16, where -0.0 != 0.0.
    nz = keep & (w.to(tl.float32) != 0.0)
    count = tl.sum(nz.to(tl.int32), axis=2)
    first = tl.min(tl.where(nz, j3, 4), axis=2)
    last = tl.max(tl.where(nz, j3, -1), axis=2)
    single_low = (count == 1) & (first < 2)
    idx0 = tl.where(count == 2, first, tl.where(single_low, first, 2))
    idx1 = tl.where(count == 2, last, tl.where(single_low, 2, 3))

    # Gather the two values as raw 16-bit patterns: a sum with one non-zero term is
    # exact and keeps the sign of -0.0.
    bits = tl.where(keep, w, 0.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    v0 = tl.sum(tl.where(j3 == idx0[:, :, None], bits, 0), axis=2)
    v1 = tl.sum(tl.where(j3 == idx1[:, :, None], bits, 0), axis=2)
    v_offs = row[:, None] * (n_cols // 2) + mcol[:, None] * 8 + t2 * 2  # (BLOCK_E, 4)
    tl.store(values_ptr + v_offs, v0.to(tl.int16), mask=e_ok[:, None])
    tl.store(values_ptr + v_offs + 1, v1.to(tl.int16), mask=e_ok[:, None])

    # Four 4-bit codes per int16, group t at bits 4t.
    code = idx0 | (idx1 << 2)
    plain = tl.sum(code << (4 * t2), axis=1)
    if META_SM90:
        # CUTLASS 3.x Sm90GemmSparseConfig::fill_layoutE, in 16-bit words (16 columns):
        # row = m0 + 8*m1 + 16*m2 + 64*mb, word column = k1 + 2*k2 + 8*kb
        # (_layout24.sm90_offsets, divided by 16).
        m0 = row % 8
        m1 = (row // 8) % 2
        m2 = (row // 16) % 4
        mb = row // 64
        k1 = mcol % 2
        k2 = (mcol // 2) % 4
        kb = mcol // 8
        dst = m1 + 2 * k2 + 8 * m0 + 64 * k1 + 128 * m2 + 512 * mb + (e_rows * 8) * kb
    else:
        # CUTLASS's reorder_meta (rows within blocks of 32, 2x2 Z->N swizzle) and
        # ColumnMajorInterleaved<2> storage (_layout24.sm80_offsets).
        dst_row = row // 32 * 32 + (row % 8) * 4 + (row % 32) // 8
        z_to_n = ((dst_row % 2) == 0) & ((mcol % 2) == 1)
        n_to_z = ((dst_row % 2) == 1) & ((mcol % 2) == 0)
        shift = z_to_n.to(tl.int64) - n_to_z.to(tl.int64)
        dst_row = dst_row + shift
        dst_col = mcol - shift
        dst = (dst_col // 2) * (2 * n_rows) + dst_row * 2 + dst_col % 2
    tl.store(meta_ptr + dst, plain.to(tl.int16), mask=e_ok)


def launch_prune_compress_24(weight: torch.Tensor, norms32: torch.Tensor | None,
                             values: torch.Tensor, meta: torch.Tensor, meta_format: str = "sm80") -> None:
    """Fill ``values`` ``(M, K/2)`` and ``meta`` (int16, in ``meta_format``) from ``weight`` ``(M, K)``.

    For ``"sm90"`` only the words of real groups are written: ``meta`` must arrive with
    its padding already filled.

    No validation here: M % 32 == 0, K % 64 == 0, fp16/bf16, outputs contiguous on the
    weight's device, ``norms32`` fp32 contiguous or None (magnitude).
    """
    m, k = weight.shape
    n_meta = m * (k // 16)
    norms_arg = norms32 if norms32 is not None else weight
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        prune_compress_24_kernel[(triton.cdiv(n_meta, _BLOCK_E),)](
            weight, norms_arg, values.view(torch.int16), meta, m, (m + 63) // 64 * 64, k, weight.stride(0),
            weight.stride(1), USE_NORMS=norms32 is not None, META_SM90=meta_format == "sm90", BLOCK_E=_BLOCK_E,
            num_warps=4,
        )
