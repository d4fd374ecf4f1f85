"""Triton kernel accumulating squared activation norms per input feature.

``sq_norms[j] += sum_t x[t, j]**2`` over all tokens t. The grid is (column blocks,
token splits); each program sums its token slice in fp32 registers and writes one
partial row. The partial rows are then summed by torch on the same stream, which
keeps the result deterministic (no float atomics, whose order varies run to run and
could flip a near-tie in the masks) and needs no host sync.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BLOCK_T = 32
_BLOCK_C = 128
_TARGET_PROGRAMS = 1024  # enough to fill an H100's 132 SMs several times over
_MAX_ITERS = 64  # at most 2048 tokens per program; more tokens mean more programs


@triton.jit
def sq_norms_kernel(
    x_ptr,  # (tokens, cols) fp16/bf16/fp32, any strides
    partial_ptr,  # (splits, cols) fp32, contiguous
    n_tokens,
    n_cols,
    stride_xt,
    stride_xc,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ITERS: tl.constexpr,  # token blocks per program (a power of two: few compiled variants)
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    col_offs = cols.to(tl.int64) * stride_xc
    t_start = pid_t * (ITERS * BLOCK_T)
    # A 2-D fp32 accumulator: elementwise adds in the loop, one reduction at the end.
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop to a runtime bound.
    for i in range(ITERS):
        toks = t_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (toks < n_tokens)[:, None] & col_ok[None, :]
        offs = toks.to(tl.int64)[:, None] * stride_xt + col_offs[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid_t.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)


def launch_sq_norms(sq_norms: torch.Tensor, x2d: torch.Tensor) -> None:
    """``sq_norms += (x2d.float() ** 2).sum(0)``. No validation here.

    Args:
        sq_norms: ``(cols,)`` fp32 on ``x2d.device``.
        x2d: ``(tokens, cols)`` fp16/bf16/fp32, any strides, CUDA (or CPU when interpreting).
    """
    tokens, cols = x2d.shape
    if tokens == 0 or cols == 0:
        return
    col_blocks = triton.cdiv(cols, _BLOCK_C)
    # Split the tokens so that the grid has about _TARGET_PROGRAMS programs; the split
    # depends only on the shape, so results are reproducible across GPUs.
    want_splits = max(1, triton.cdiv(_TARGET_PROGRAMS, col_blocks))
    iters = min(_MAX_ITERS, triton.next_power_of_2(triton.cdiv(triton.cdiv(tokens, want_splits), _BLOCK_T)))
    splits = triton.cdiv(tokens, iters * _BLOCK_T)
    partial = torch.empty(splits, cols, dtype=torch.float32, device=x2d.device)
    with torch.cuda.device(x2d.device) if x2d.is_cuda else contextlib.nullcontext():
        sq_norms_kernel[(col_blocks, splits)](
            x2d, partial, tokens, cols, x2d.stride(0), x2d.stride(1),
            BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, ITERS=iters, num_warps=4,
        )
    sq_norms.add_(partial.sum(dim=0))
