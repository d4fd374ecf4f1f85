"""SparseLinear: a drop-in nn.Linear whose 2:4 weight runs on sparse tensor cores.

``forward`` calls the custom op ``torch.ops.wanda_kernels.sparse24_linear``, which runs
the CUTLASS 2:4 GEMM of the compiled extension on CUDA GPUs of compute capability 8.x
or 9.x, and otherwise ``F.linear`` on the decompressed weight, with one warning that
says why. The op has a fake (meta) implementation, so ``torch.compile`` traces it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._ext import extension, extension_error, runs_on
from .sparse24 import COL_MULTIPLE, DTYPES_24, ROW_MULTIPLE, check_24_sparse, compress_24, decompress_24

__all__ = ["SparseLinear", "sparsify_", "cutlass_unavailable_reason"]

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
_TOKEN_MULTIPLE = 8  # CUTLASS loads x and stores y 8 elements at a time
_DECODE_MAX_TOKENS = 128  # up to this many (padded) tokens use the small-tile configuration


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def cutlass_unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the CUTLASS kernel cannot run on input ``x`` (None when it can)."""
    if x.device.type != "cuda":
        return f"the input is on {x.device} (the CUTLASS 2:4 kernel runs on CUDA GPUs)"
    if x.dtype not in DTYPES_24:
        return f"the input is {x.dtype} (the kernel takes float16 or bfloat16)"
    if extension() is None:
        return extension_error()
    major, minor = torch.cuda.get_device_capability(x.device)
    if not runs_on(major, minor):
        return (f"GPU compute capability {major}.{minor} is not among the built architectures "
                f"{extension().cuda_archs} (2:4 sparse tensor cores: 8.x, 9.x)")
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"SparseLinear runs dense F.linear on the decompressed weight: {reason}", RuntimeWarning,
                  stacklevel=3)


def launch_sparse24_gemm(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, d: torch.Tensor) -> None:
    """``d = W @ xb.T`` with the CUTLASS kernel; no padding, no validation beyond CUTLASS's own.

    Args:
        values, meta: the compressed weight ``(M, K/2)``, ``(M, K/16)`` int16 (M, K padded).
        xb: ``(N, K)`` activations, row-major, ``N % 8 == 0``, on the weight's CUDA device.
        d: ``(M, N)`` contiguous output of ``xb``'s dtype.
    """
    ext = extension()
    m_pad, k_pad, n_pad = values.shape[0], 2 * values.shape[1], xb.shape[0]
    config = 0 if n_pad <= _DECODE_MAX_TOKENS else 1
    with torch.cuda.device(xb.device):
        status = ext.sparse24_gemm(
            _DTYPE_CODE[xb.dtype], config, m_pad, n_pad, k_pad, values.data_ptr(), meta.data_ptr(), xb.data_ptr(),
            xb.stride(0), d.data_ptr(), d.stride(0), torch.cuda.current_stream(xb.device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"CUTLASS 2:4 sparse GEMM failed ({ext.status_string(status)}): weight padded to "
                           f"{m_pad}x{k_pad}, input padded to {n_pad}x{k_pad}, {xb.dtype}, config {config}")


def _cutlass_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the CUTLASS kernel; pads tokens and in_features as needed."""
    in_features = x.shape[-1]
    m_pad, k_pad = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, in_features)
    n = x2d.shape[0]
    y = torch.empty(n, out_features, dtype=x.dtype, device=x.device)
    if n == 0:
        return y.reshape(*x.shape[:-1], out_features)
    n_pad = _round_up(n, _TOKEN_MULTIPLE)
    if n_pad != n or k_pad != in_features or x2d.stride(1) != 1 or x2d.stride(0) % 8 or x2d.data_ptr() % 16:
        xb = x2d.new_zeros(n_pad, k_pad)
        xb[:n, :in_features] = x2d
    else:
        xb = x2d
    d = torch.empty(m_pad, n_pad, dtype=x.dtype, device=x.device)  # D = W @ x^T, (out, tokens)
    try:
        launch_sparse24_gemm(values, meta, xb, d)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (SparseLinear {in_features} -> {out_features}, input of {n} tokens)") from exc
    # One pass: transpose D into y (tokens, out) and add the bias.
    dt = d[:out_features, :n].t()
    if bias is not None:
        torch.add(dt, bias, out=y)
    else:
        y.copy_(dt)
    return y.reshape(*x.shape[:-1], out_features)


# Optional[...], not "X | None": torch evaluates these annotations to infer the op's
# schema, and must be able to on Python 3.9.
@torch.library.custom_op("wanda_kernels::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                    out_features: int) -> torch.Tensor:
    """``x (..., in) -> (..., out_features)`` with a compressed 2:4 weight (see SparseLinear)."""
    reason = cutlass_unavailable_reason(x)
    if reason is None:
        return _cutlass_linear(x, values, meta, bias, out_features)
    _warn_once(reason)
    weight = decompress_24(values, meta)[:out_features, : x.shape[-1]]
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, values, meta, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W stored 2:4-compressed (CUTLASS format).

    Buffers (so ``state_dict`` round-trips): ``values`` ``(M, K/2)``, ``meta``
    ``(M, K/16)`` int16 and ``bias`` ``(out_features,)`` or None, where ``M`` and ``K``
    are ``out_features`` and ``in_features`` rounded up to multiples of 32 and 64 (the
    kernel's granularity; the padding is zeros and invisible from outside).

    Build one with :meth:`from_linear` or :meth:`from_dense`. ``forward`` takes
    ``x (..., in_features)`` of the weight's dtype and returns ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if dtype not in DTYPES_24:
            raise TypeError(f"SparseLinear stores float16 or bfloat16 weights; got dtype={dtype}")
        self.in_features, self.out_features = in_features, out_features
        m, k = _round_up(out_features, ROW_MULTIPLE), _round_up(in_features, COL_MULTIPLE)
        values, meta = compress_24(torch.zeros(m, k, dtype=dtype, device=device))
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
        """From a 2:4 sparse weight ``(out, in)`` float16/bfloat16 and an optional bias ``(out,)``.

        Raises ValueError naming the first row and group that is not 2:4.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor (out_features, in_features); got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.dtype not in DTYPES_24:
            raise TypeError(f"SparseLinear stores float16 or bfloat16 weights; got {weight.dtype}. "
                            "Convert the model first, e.g. model.half() or model.to(torch.bfloat16)")
        out_features, in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({out_features},); got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        weight = weight.detach()
        check_24_sparse(weight)
        module = cls(in_features, out_features, bias is not None, dtype=weight.dtype, device=weight.device)
        m, k = module.values.shape[0], 2 * module.values.shape[1]
        padded = weight.new_zeros(m, k)
        padded[:out_features, :in_features] = weight
        module.values, module.meta = compress_24(padded)
        if bias is not None:
            module.bias = bias.detach().to(weight.dtype).clone()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """From an ``nn.Linear`` whose weight is already 2:4 sparse (see ``prune_(..., pattern="2:4")``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight."""
        return decompress_24(self.values, self.meta)[: self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects input (..., {self.in_features}); got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"SparseLinear holds {self.values.dtype} weights; got input of {x.dtype}")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but SparseLinear is on {self.values.device}")
        return torch.ops.wanda_kernels.sparse24_linear(x, self.values, self.meta, self.bias, self.out_features)

    def backend(self) -> str:
        """What ``forward`` runs for inputs on this module's device."""
        probe = torch.empty(0, dtype=self.values.dtype, device=self.values.device)
        reason = cutlass_unavailable_reason(probe)
        return "cutlass-2:4" if reason is None else f"dense fallback ({reason.split(';')[0]})"

    def extra_repr(self) -> str:
        padded = tuple(self.values.shape[:1]) + (2 * self.values.shape[1],)
        pad = "" if padded == (self.out_features, self.in_features) else f", padded={padded}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}{pad}, values={tuple(self.values.shape)}, meta={tuple(self.meta.shape)}, "
                f"backend={self.backend()}")


def sparsify_(model: nn.Module, filter_fn=None) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose weight is 2:4 sparse by a ``SparseLinear``.

    Args:
        model: the module to modify.
        filter_fn: optional ``(name, linear) -> bool``; only layers for which it returns
            True are considered.

    Returns:
        The names (as in ``model.named_modules()``) of the replaced layers.

    Raises:
        TypeError: a 2:4 layer is float32/float64 (convert the model to fp16/bf16 first).
        ValueError: ``model`` is itself an ``nn.Linear`` (use ``SparseLinear.from_linear``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("sparsify_ replaces submodules; for a single layer use SparseLinear.from_linear(linear)")
    from .sparse24 import is_24_sparse

    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not is_24_sparse(module.weight.detach()):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if module.weight.dtype not in DTYPES_24:
            raise TypeError(f"{name} is 2:4 sparse but {module.weight.dtype}; SparseLinear stores float16 or "
                            "bfloat16: convert the model first (model.half() or model.to(torch.bfloat16))")
        targets.append(name)
    # Convert all first, then swap: a failure leaves the model unchanged.
    replacements = {name: SparseLinear.from_linear(model.get_submodule(name)) for name in targets}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return targets
