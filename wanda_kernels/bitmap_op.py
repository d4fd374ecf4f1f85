"""``y = x W^T + b`` with W in the bitmap format: operand checks, Triton or dense, the ``torch.library`` op.

``torch.ops.wanda_kernels.bitmap_linear`` checks its operands (:func:`check_operands`:
shapes, dtypes, devices; no data is read), then runs the Triton kernel
(``kernels/bitmap_matmul.py``) on CUDA, or ``F.linear`` on the decompressed weight
elsewhere, with one warning that says why. It has a fake (meta) implementation, so
``torch.compile`` traces it. ``BitmapLinear`` calls :func:`kernel_linear` directly in
eager mode (its operands are right by construction).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._backend import resolve_backend, triton_available, triton_interpreting
from ._validation import BACKENDS, check_bias, check_choice
from ._warn import warn_once
from .bitmap import CHUNK_COLS, _dense, check_bitmap, table_chunks

__all__ = ["bitmap_linear", "check_operands", "kernel_linear", "dense_linear", "implementation",
           "fallback_reason", "warn_fallback"]


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_operands(x, values, bitmap, chunks, bias) -> None:
    """The op's checks, ``TypeError``/``ValueError`` naming the tensor: ``x (..., in)`` of the
    values' dtype (float16/bfloat16); ``bitmap (out, ceil(in/32))`` int32; ``values`` of the
    format (:func:`~wanda_kernels.bitmap.check_bitmap`; 1-D for unequal rows); ``chunks
    (out, ceil(in/CHUNK_COLS))`` int32; ``bias (out,)`` of x's dtype or None; one device.

    Shapes, dtypes and devices only: no data is read (no host synchronisation), so bits
    that do not match the values are not caught here; ``BitmapLinear`` checks them when it
    is built or loaded (:func:`~wanda_kernels.bitmap.check_bitmap_data`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be (..., in_features) with in_features >= 1; got shape {_shape(x)}")
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
        raise ValueError(f"values must be a 1-D or 2-D tensor; got {_shape(values)}")
    in_features = x.shape[-1]
    out, _ = check_bitmap(values, bitmap, in_features, unequal_rows=values.dim() == 1)
    if x.dtype != values.dtype:
        raise TypeError(f"x is {x.dtype} but values is {values.dtype}: the input must have the weight's dtype")
    n_chunks = table_chunks(in_features)
    if not isinstance(chunks, torch.Tensor) or chunks.dtype != torch.int32 or tuple(chunks.shape) != (out, n_chunks):
        raise ValueError(f"chunks (the chunk offset table) must be int32 of shape ({out}, {n_chunks}); got "
                         f"{getattr(chunks, 'dtype', '')} {_shape(chunks)}")
    check_bias(bias, out, x)
    for name, t in (("bitmap", bitmap), ("chunks", chunks), ("bias", bias)):  # values: on bitmap's (checked)
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not chunks.is_contiguous():
        raise ValueError(f"chunks must be contiguous; got strides {chunks.stride()}")


def fallback_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run for tensors on ``device`` with ``backend="auto"`` (None: it runs)."""
    if device.type != "cuda":
        return f"the bitmap kernels run on CUDA GPUs and the layer is on {device}"
    if not triton_available():
        return "Triton is not installed (pip install 'triton>=3.6')"
    return None


def implementation(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` (dense) for a call with ``backend`` on ``device``.

    ``"auto"`` never picks the interpreter; ``"triton"`` raises where Triton cannot run.
    """
    if backend == "auto":
        return "torch" if fallback_reason(device) else "triton"
    return resolve_backend(backend, device)


def fallback_message(reason: str, layers: int | None = None) -> str:
    """The one warning for BitmapLinear layers that run dense, and why."""
    who = "BitmapLinear" if layers is None else f"the model's {layers} BitmapLinear layers"
    return f"{who} run{'s' if layers is None else ''} dense F.linear on the decompressed weight: {reason}"


def warn_fallback(reason: str, layers: int | None = None) -> bool:
    """Warn, once per reason and process, that BitmapLinear runs dense."""
    return warn_once(f"bitmap-fallback: {reason}", fallback_message(reason, layers))


def kernel_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, chunks: torch.Tensor,
                  bias: torch.Tensor | None, splits: int | None = None) -> torch.Tensor:
    """The Triton kernel: ``x (..., in) -> (..., out)``; operands as :func:`check_operands` wants them.

    ``splits`` forces the number of K splits (None: the launcher's choice). No host
    synchronisation: capturable in a CUDA graph.
    """
    from .kernels.bitmap_matmul import launch_bitmap_linear

    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features)
    out = bitmap.shape[0]
    y = torch.empty(x2d.shape[0], out, dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        launch_bitmap_linear(x2d, values, bitmap, chunks, bias, y, CHUNK_COLS, splits,
                             dot_in_fp32=x.dtype == torch.bfloat16 and triton_interpreting())
    return y.reshape(*x.shape[:-1], out)


def dense_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on the decompressed weight: the same products, summed by torch."""
    return F.linear(x, _dense(values, bitmap, x.shape[-1]), bias)


# Optional[...], not "X | None": torch evaluates these annotations to infer the op's schema.
@torch.library.custom_op("wanda_kernels::bitmap_linear", mutates_args=())
def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, chunks: torch.Tensor,
                  bias: Optional[torch.Tensor], backend: str = "auto") -> torch.Tensor:  # noqa: UP045
    """``x (..., in) -> (..., out)`` with a bitmap-format weight (see ``BitmapLinear``).

    ``values`` and ``bitmap`` as :func:`~wanda_kernels.bitmap.compress_bitmap` returns them,
    ``chunks`` their :func:`~wanda_kernels.bitmap.chunk_offsets`, ``bias (out,)`` or None,
    all on ``x``'s device and of its dtype (float16/bfloat16). ``backend``: ``"auto"``
    (Triton on CUDA, dense elsewhere, with one warning), ``"triton"`` or ``"torch"``.
    """
    check_choice("backend", backend, BACKENDS)
    check_operands(x, values, bitmap, chunks, bias)
    if implementation(backend, x.device) == "triton":
        return kernel_linear(x, values, bitmap, chunks, bias)
    if backend == "auto":
        warn_fallback(fallback_reason(x.device))
    return dense_linear(x, values, bitmap, bias)


@bitmap_linear.register_fake
def _bitmap_linear_fake(x, values, bitmap, chunks, bias, backend="auto"):
    check_operands(x, values, bitmap, chunks, bias)
    return x.new_empty(*x.shape[:-1], bitmap.shape[0])

