"""``y = x @ W.T + b`` with a compressed 2:4 weight: input padding, the kernel calls, the ``torch.library`` op.

``torch.ops.wanda_kernels.sparse24_linear`` checks its operands (:func:`check_operands`,
errors naming the tensor), then runs the kernel that :func:`~.policy.select_kernel`
picks for the input's device, or, with a warning that says why (once per reason),
``F.linear`` on the decompressed weight. It has a fake (meta) implementation, so
``torch.compile`` traces it.

``SparseLinear`` holds operands that are right by construction and has chosen its
kernel when it was built or moved (:func:`kernel_linear`): in eager mode it calls that
function directly, without the op's checks, kernel choice and dispatcher round trip
(together several times the launch itself on the host).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._layout24 import COL_MULTIPLE, DTYPES_24, META_FORMATS, ROW_MULTIPLE, meta_shape, round_up
from .._validation import check_bias, check_choice, check_positive_int
from .._warn import warn_once
from ..sparse24 import decompress_24
from .launch import launch_sm80, launch_sm90
from .policy import kernel_unavailable, unavailable_reason

__all__ = [
    "sparse24_linear",
    "check_operands",
    "kernel_linear",
    "sm80_linear",
    "sm90_linear",
    "pad_input",
    "sm80_tokens",
    "TOKEN_MULTIPLE",
]

TOKEN_MULTIPLE = 8  # the sm80 kernel loads x and stores D 8 elements at a time


def sm80_tokens(n: int) -> int:
    """Rows of input the sm80 kernel runs for ``n`` tokens: ``n`` rounded up to ``TOKEN_MULTIPLE``."""
    return round_up(n, TOKEN_MULTIPLE)


def pad_input(x2d: torch.Tensor, tokens: int, k_pad: int) -> torch.Tensor:
    """``x2d (n, in)`` itself when a kernel can read it in place as ``(tokens, k_pad)``, else a zero-padded copy.

    In place needs: no padding, unit column stride, a row stride that is at least
    ``k_pad`` and a multiple of 8 elements, and a 16-byte aligned start.
    """
    n, in_features = x2d.shape
    stride0 = x2d.stride(0)
    if (tokens != n or k_pad != in_features or x2d.stride(1) != 1 or stride0 < k_pad or stride0 % 8
            or x2d.data_ptr() % 16):
        xb = x2d.new_zeros(tokens, k_pad)
        xb[:n, :in_features] = x2d
        return xb
    return x2d


def sm80_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """sm80 kernel: ``x (..., in) -> (..., out_features)``; pads tokens and in_features as needed."""
    in_features = x.shape[-1]
    m_pad, k_pad = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, in_features)
    n = x2d.shape[0]
    y = torch.empty(n, out_features, dtype=x.dtype, device=x.device)
    if n == 0:
        return y.reshape(*x.shape[:-1], out_features)
    xb = pad_input(x2d, sm80_tokens(n), k_pad)
    d = torch.empty(m_pad, xb.shape[0], dtype=x.dtype, device=x.device)  # D = W @ x^T, (out, tokens)
    try:
        launch_sm80(values, meta, xb, d)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (SparseLinear {in_features} -> {out_features}, input of {n} tokens)") from exc
    # One pass: transpose D into y (tokens, out) and add the bias.
    dt = d[:out_features, :n].t()
    if bias is not None:
        torch.add(dt, bias, out=y)
    else:
        y.copy_(dt)
    return y.reshape(*x.shape[:-1], out_features)


def sm90_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """sm90a kernel: ``x (..., in) -> (..., out_features)``, y written row-major by the kernel, bias in its epilogue.

    Tokens are never padded (TMA clips the ragged tile); in_features is padded only when
    it is not the weight's padded K, and out_features only when it is not a multiple of 8.
    """
    in_features = x.shape[-1]
    k_pad = 2 * values.shape[1]
    x2d = x.reshape(-1, in_features)
    n = x2d.shape[0]
    m = round_up(out_features, 8)
    y = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if n == 0:
        return y[:, :out_features].reshape(*x.shape[:-1], out_features)
    xb = pad_input(x2d, n, k_pad)
    if bias is not None:
        if bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # the epilogue reads the bias as the output's element type
        if m != out_features or bias.data_ptr() % 16 or not bias.is_contiguous():
            bias = torch.cat([bias.reshape(-1), bias.new_zeros(m - out_features)])
    try:
        launch_sm90(values, meta, xb, y, bias)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (SparseLinear {in_features} -> {out_features}, input of {n} tokens)") from exc
    if m != out_features:
        y = y[:, :out_features].contiguous()
    return y.reshape(*x.shape[:-1], out_features)


def kernel_linear(device: torch.device, dtype: torch.dtype, meta_format: str):
    """:func:`sm90_linear` or :func:`sm80_linear`: the kernel function for a weight on ``device``
    of ``dtype`` with metadata in ``meta_format``, or None when no kernel runs it there (the op
    then runs the dense fallback and says why).
    """
    if kernel_unavailable(device, dtype, meta_format) is not None:
        return None
    return sm90_linear if meta_format == "sm90" else sm80_linear


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_operands(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int, meta_format: str) -> None:
    """The op's argument checks: ``TypeError``/``ValueError`` naming the tensor and what it got.

    ``values (M, K/2)``: float16/bfloat16 of ``x``'s dtype, contiguous, ``M % 32 == 0``,
    ``K % 64 == 0``, ``M >= out_features``, ``K >= x.shape[-1]``; ``meta``: int16,
    contiguous, ``meta_shape(M, K, meta_format)``; ``bias``: ``(out_features,)`` of
    ``x``'s dtype, or None; all on ``x``'s device. Shapes, dtypes and devices only: no
    tensor data is read.
    """
    check_choice("meta_format", meta_format, META_FORMATS)
    check_positive_int("out_features", out_features)
    for name, t in (("x", x), ("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be (..., in_features) with in_features >= 1; got shape {_shape(x)}")
    if values.dtype not in DTYPES_24:
        raise TypeError(f"values must be float16 or bfloat16; got {values.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"x is {x.dtype} but values is {values.dtype}: the input must have the weight's dtype")
    if values.dim() != 2 or values.shape[0] % ROW_MULTIPLE or (2 * values.shape[1]) % COL_MULTIPLE:
        raise ValueError(f"values must be (M, K/2) with M % {ROW_MULTIPLE} == 0 and K % {COL_MULTIPLE} == 0 (a "
                         f"padded weight from compress_24); got shape {_shape(values)}")
    m, k = values.shape[0], 2 * values.shape[1]
    if out_features > m:
        raise ValueError(f"out_features={out_features} but values holds only {m} rows")
    if x.shape[-1] > k:
        raise ValueError(f"x has in_features={x.shape[-1]} but values holds only K={k} columns")
    want = meta_shape(m, k, meta_format)
    if meta.dtype != torch.int16 or tuple(meta.shape) != want:
        raise ValueError(f"meta for values {_shape(values)} in the {meta_format} layout must be int16 of shape "
                         f"{want}; got {meta.dtype} {_shape(meta)}")
    check_bias(bias, out_features, x)
    for name, t in (("values", values), ("meta", meta), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if name != "bias" and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels read it with packed strides); got strides "
                             f"{t.stride()}")


def fallback_message(reason: str, layers: int | None = None) -> str:
    """The one warning for SparseLinear layers that run dense, and why."""
    who = "SparseLinear" if layers is None else f"the model's {layers} SparseLinear layers"
    return f"{who} run{'s' if layers is None else ''} dense F.linear on the decompressed weight: {reason}"


def warn_fallback(reason: str, layers: int | None = None) -> bool:
    """Warn, once per reason and process, that SparseLinear runs dense; attributed to the caller's code."""
    return warn_once(f"sparse24-fallback: {reason}", fallback_message(reason, layers))


# Optional[...], not "X | None": torch evaluates these annotations to infer the op's
# schema, and must be able to on Python 3.9.
@torch.library.custom_op("wanda_kernels::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                    out_features: int, meta_format: str = "sm80") -> torch.Tensor:
    """``x (..., in) -> (..., out_features)`` with a compressed 2:4 weight (see ``SparseLinear``).

    ``values (M, K/2)`` and ``meta`` (int16, in ``meta_format``) are a padded weight on
    ``x``'s device, of ``x``'s dtype; ``bias`` is ``(out_features,)`` or None (see
    :func:`check_operands`, which raises naming the tensor otherwise).
    """
    check_operands(x, values, meta, bias, out_features, meta_format)
    reason = unavailable_reason(x, meta_format)
    if reason is None:
        if meta_format == "sm90":
            return sm90_linear(x, values, meta, bias, out_features)
        return sm80_linear(x, values, meta, bias, out_features)
    warn_fallback(reason)
    weight = decompress_24(values, meta, meta_format=meta_format)[:out_features, : x.shape[-1]]
    return F.linear(x, weight, bias)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, values, meta, bias, out_features, meta_format="sm80"):
    check_operands(x, values, meta, bias, out_features, meta_format)
    return x.new_empty(*x.shape[:-1], out_features)
