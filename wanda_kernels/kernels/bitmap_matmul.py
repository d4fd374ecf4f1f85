"""Triton kernel: ``y = x W^T (+ b)`` with W in the bitmap format (``wanda_kernels/bitmap.py``).

"Load sparse, compute dense": a program owns ``BLOCK_N`` rows of W (outputs) and
``BLOCK_T`` tokens, and walks along K in tiles of ``BLOCK_K`` columns. For each tile it
loads the rows' bitmap words (``BLOCK_K / 32`` per row) and expands them in registers:
a kept weight's place in the row's packed values is the row's running count plus the
exclusive prefix sum of the bits before it in the tile. The packed values of a tile are
contiguous within a row, so those loads touch consecutive addresses; pruned places load
nothing. The dense ``(BLOCK_N, BLOCK_K)`` tile then meets x in fp32:

* ``USE_DOT=False`` (1 to 4 tokens, decode): broadcast multiply and sum, no padding of
  the token dimension to tl.dot's 16;
* ``USE_DOT=True`` (more tokens): ``tl.dot`` on the tensor cores, fp32 accumulation.

Decode (up to 16 tokens) is memory-bound and its grid is small (``out / BLOCK_N``
programs), so K is split (grid axis 1): a split starts at a chunk of ``CHUNK`` columns
(``bitmap.CHUNK_COLS``) and finds its place in the values in the chunk offset table, one
load per row, instead of counting the bits of every word before it (which would read up
to the whole bitmap row again). Splits write fp32 partial sums that torch adds in a
fixed order (deterministic, no atomics).

Launch parameters here are first guesses, not yet tuned on a GPU (``config_for``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

DECODE_MAX_TOKENS = 16  # up to here: split-K; beyond, token tiles and no split


@triton.jit
def _expand_tile(values_ptr, bitmap_ptr, rows, row_ok, start, k0, n_words, stride_br,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense ``(BLOCK_N, BLOCK_K)`` tile of W at columns ``k0 ..``, and the rows' counts after it.

    ``start`` (int64, per row) is the index in the flattened values of the row's first
    kept weight at or after column ``k0``; ``k0`` is a multiple of 32.
    """
    widx = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(bitmap_ptr + rows[:, None] * stride_br + widx[None, :],
                    mask=row_ok[:, None] & (widx < n_words)[None, :], other=0)
    # Bit b of word w is column 32 w + b: shifting the (sign-extended) word right and
    # keeping the low bit reads it whatever the sign.
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))
    place = start[:, None] + (tl.cumsum(bits, axis=1) - bits)  # kept weights before this column
    w = tl.load(values_ptr + place, mask=bits != 0, other=0.0)
    return w, start + tl.sum(bits, axis=1)


@triton.jit
def bitmap_linear_kernel(
    x_ptr,  # (tokens, K) fp16/bf16, any strides
    values_ptr,  # the packed kept weights, x's dtype, flattened
    bitmap_ptr,  # (N, ceil(K/32)) int32
    chunks_ptr,  # (N, ceil(K/CHUNK)) int32: the chunk offset table
    bias_ptr,  # (N,) x's dtype; unused unless HAS_BIAS
    y_ptr,  # (tokens, N) x's dtype, contiguous; or, with SPLIT_OUT, (splits, tokens, N) fp32
    n_tokens,
    n_rows,
    n_cols,
    chunks_per_split,  # chunks of K per split (grid axis 1)
    stride_xt,
    stride_xk,
    stride_br,
    stride_cr,
    HAS_BIAS: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ITERS: tl.constexpr,  # K tiles per program (constexpr: Triton 3.6's interpreter loops to constant bounds)
    CHUNK: tl.constexpr,  # columns per chunk of the table
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < n_tokens
    chunk = pid_s * chunks_per_split
    start = tl.load(chunks_ptr + rows * stride_cr + chunk, mask=row_ok, other=0).to(tl.int64)
    k_begin = chunk * CHUNK
    n_words = tl.cdiv(n_cols, 32)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for i in range(ITERS):
        k0 = k_begin + i * BLOCK_K
        w, start = _expand_tile(values_ptr, bitmap_ptr, rows, row_ok, start, k0, n_words, stride_br,
                                BLOCK_N, BLOCK_K)
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + toks[:, None] * stride_xt + cols[None, :].to(tl.int64) * stride_xk,
                    mask=tok_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
        if DOT_IN_FP32:  # only under the interpreter, whose bf16 tl.dot is wrong (bf16 held as raw uint16)
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
        elif USE_DOT:
            acc = tl.dot(w, tl.trans(x), acc)  # (BLOCK_N, BLOCK_K) @ (BLOCK_K, BLOCK_T), fp32 accumulation
        else:
            acc += tl.sum(w.to(tl.float32)[:, None, :] * x.to(tl.float32)[None, :, :], axis=2)
    out_ok = row_ok[:, None] & tok_ok[None, :]
    y_offs = toks[None, :] * n_rows + rows[:, None]  # y is (tokens, N): rows are the contiguous axis
    if SPLIT_OUT:
        tl.store(y_ptr + pid_s.to(tl.int64) * n_tokens * n_rows + y_offs, acc, mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def config_for(tokens: int) -> dict:
    """Launch parameters for ``tokens`` rows of input (untuned first guesses; see the module doc).

    The broadcast product holds ``BLOCK_N * BLOCK_T * BLOCK_K`` fp32 values per program;
    each decode choice keeps that at 8192 (64 per thread with 4 warps).
    """
    if tokens <= 1:
        return dict(BLOCK_T=1, BLOCK_N=64, BLOCK_K=128, USE_DOT=False, num_warps=4)
    if tokens <= 2:
        return dict(BLOCK_T=2, BLOCK_N=64, BLOCK_K=64, USE_DOT=False, num_warps=4)
    if tokens <= 4:
        return dict(BLOCK_T=4, BLOCK_N=32, BLOCK_K=64, USE_DOT=False, num_warps=4)
    if tokens <= DECODE_MAX_TOKENS:  # tl.dot needs 16 tokens: 5..15 are padded (masked), compute is free here
        return dict(BLOCK_T=16, BLOCK_N=64, BLOCK_K=128, USE_DOT=True, num_warps=4)
    return dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=64, USE_DOT=True, num_warps=4)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(device: torch.device, tokens: int, n_rows: int, n_chunks: int) -> int:
    """K splits for a call: enough programs for two per SM at decode sizes, none beyond."""
    if tokens > DECODE_MAX_TOKENS or device.type != "cuda":
        return 1
    cfg = config_for(tokens)
    programs = triton.cdiv(n_rows, cfg["BLOCK_N"]) * triton.cdiv(tokens, cfg["BLOCK_T"])
    return max(1, min(n_chunks, triton.cdiv(2 * _sm_count(device.index or 0), programs)))


def launch_bitmap_linear(x2d: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, chunks: torch.Tensor,
                         bias: torch.Tensor | None, y: torch.Tensor, chunk_cols: int, splits: int | None = None,
                         dot_in_fp32: bool = False) -> None:
    """Write ``x2d @ W^T (+ bias)`` into ``y``. No validation here.

    Args:
        x2d: ``(tokens, K)`` fp16/bf16, any strides, ``tokens >= 1``.
        values, bitmap, chunks: the weight (values of x's dtype, bitmap ``(N, ceil(K/32))``
            int32, chunk offset table ``(N, ceil(K/CHUNK_COLS))`` int32), contiguous.
        bias: ``(N,)`` of x's dtype or None.
        y: ``(tokens, N)`` of x's dtype, contiguous.
        chunk_cols: columns per chunk of the table (``bitmap.CHUNK_COLS``), a multiple of every BLOCK_K.
        splits: K splits (None: :func:`default_splits`); the tests force several.
        dot_in_fp32: run tl.dot on fp32 copies of the tiles; for bf16 under the interpreter
            only, whose bf16 tl.dot is wrong (values exact either way: bf16 -> fp32 is exact).
    """
    tokens, k = x2d.shape
    n, n_chunks = chunks.shape
    cfg = dict(config_for(tokens))
    num_warps = cfg.pop("num_warps")
    if splits is None:
        splits = default_splits(x2d.device, tokens, n, n_chunks)
    per_split = triton.cdiv(n_chunks, max(1, min(splits, n_chunks)))
    splits = triton.cdiv(n_chunks, per_split)
    span = k if splits == 1 else per_split * chunk_cols
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits, triton.cdiv(tokens, cfg["BLOCK_T"]))
    out = torch.empty(splits, tokens, n, dtype=torch.float32, device=y.device) if splits > 1 else y
    with torch.cuda.device(x2d.device) if x2d.is_cuda else contextlib.nullcontext():
        bitmap_linear_kernel[grid](
            x2d, values, bitmap, chunks, bias if bias is not None else values, out, tokens, n, k, per_split,
            x2d.stride(0), x2d.stride(1), bitmap.stride(0), chunks.stride(0),
            HAS_BIAS=bias is not None, SPLIT_OUT=splits > 1, DOT_IN_FP32=dot_in_fp32 and cfg["USE_DOT"],
            ITERS=triton.cdiv(span, cfg["BLOCK_K"]),
            CHUNK=chunk_cols, num_warps=num_warps, **cfg,
        )
    if splits > 1:  # the splits' fp32 partial sums, added in one fixed order
        total = out.sum(dim=0)
        if bias is not None:
            total += bias.float()
        y.copy_(total)
