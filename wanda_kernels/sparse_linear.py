"""SparseLinear: a drop-in nn.Linear whose 2:4 weight runs on sparse tensor cores.

``forward`` calls the custom op ``torch.ops.wanda_kernels.sparse24_linear``, which picks
the kernel from the GPU it runs on:

* compute capability 9.0 (H100, H200): the CUTLASS 3.x sm90a kernel (sparse wgmma),
  reading the metadata in the sm90 layout;
* 8.x (A100, A10, L4, RTX 30/40): the CUTLASS sm80 kernel (mma.sp), sm80 layout;
* anything else, or a build without that kernel: ``F.linear`` on the decompressed
  weight, with one warning that says why.

A ``SparseLinear`` keeps one ``values`` tensor (the same for both kernels) and its
metadata in the layout of the kernel that will run on its device: it converts when it
is built, moved (``.to``, ``.cuda``) or loaded. Its ``state_dict`` always holds the sm80
layout, which is also PyTorch's, so checkpoints move between GPUs. The op has a fake
(meta) implementation, so ``torch.compile`` traces it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._ext import extension, extension_error, runs_on, sm90_built
from .sparse24 import (
    COL_MULTIPLE,
    DTYPES_24,
    ROW_MULTIPLE,
    _round_up,
    check_24_sparse,
    compress_24,
    decompress_24,
    meta_sm80_to_sm90,
    meta_sm90_to_sm80,
)

__all__ = ["SparseLinear", "sparsify_", "cutlass_unavailable_reason", "select_kernel"]

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
_TOKEN_MULTIPLE = 8  # the sm80 kernel loads x and stores y 8 elements at a time
_DECODE_MAX_TOKENS = 128  # sm80: up to this many (padded) tokens use the small-tile configuration
SM90_CONFIGS = {"decode": 0, "large": 1, "streamk": 2, "wide": 3}

# sm90a dispatch, read off benchmarks/tune_sm90.py on an H100 SXM (raw times in
# benchmarks/results/h100/round2/tune_sm90_fp16_*.json; a CPU test replays the rule on
# them). It counts each configuration's output tiles (one CTA each) against the
# multiprocessors. Up to 128 tokens the weight's bytes dominate and only the two
# small-N tiles are considered; above, the largest tile first:
#   wide    (128 x 256) once it has at least half a wave of tiles;
#   large   (128 x 128) once it has at least a quarter of a wave;
#   decode  (64 x 32) while its tiles fit in one wave;
#   streamk (128 x 32) otherwise: it splits K so that a partial wave stays busy.
# Tiles are ceil(out_features / tile M) * ceil(tokens / tile N).
SM90_DISPATCH: tuple[tuple[str, int, int, float], ...] = (
    # (configuration, tile M, tile N, least tiles as a fraction of the SM count)
    ("wide", 128, 256, 0.5),
    ("large", 128, 128, 0.25),
)
_SM90_DECODE_TILE = (64, 32)
_SM90_SMALL_N_TOKENS = 128


def sm90_config_for(tokens: int, out_features: int, sm_count: int) -> str:
    """The sm90a configuration ``SparseLinear`` runs for ``tokens`` rows of input (see ``SM90_DISPATCH``)."""
    def tiles(tile_m: int, tile_n: int) -> int:
        return -(-out_features // tile_m) * -(-tokens // tile_n)

    for config, tile_m, tile_n, least in SM90_DISPATCH:
        if tokens > _SM90_SMALL_N_TOKENS and tiles(tile_m, tile_n) >= least * sm_count:
            return config
    return "decode" if tiles(*_SM90_DECODE_TILE) <= sm_count else "streamk"


def select_kernel(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """``(kernel, None)`` with kernel ``"sm90"`` or ``"sm80"``, or ``(None, why not)``.

    The rule: compute capability 9.0 -> the sm90a kernel; 8.x -> the sm80 kernel;
    anything else (or a build without the kernel) -> no kernel: dense fallback.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"the input is on {device} (the CUTLASS 2:4 kernels run on CUDA GPUs)"
    if dtype not in DTYPES_24:
        return None, f"the input is {dtype} (the kernels take float16 or bfloat16)"
    if extension() is None:
        return None, extension_error()
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        if sm90_built():
            return "sm90", None
        return None, ("GPU compute capability 9.0 needs the sm90a (Hopper) kernels, and this build of "
                      f"wanda_kernels._C has none (built for {extension().cuda_archs}); rebuild with "
                      "WANDA_KERNELS_CUDA_ARCHS including 90 (the sm80 kernel is slower than dense on Hopper)")
    if major == 8 and runs_on(major, minor):
        return "sm80", None
    return None, (f"GPU compute capability {major}.{minor}: the 2:4 kernels cover 8.x (sm80) and 9.0 (sm90a); "
                  f"this build has {extension().cuda_archs}")


def _meta_format_for(device: torch.device, dtype: torch.dtype) -> str:
    """The metadata layout a SparseLinear keeps on ``device``: that of the kernel that will run."""
    return "sm90" if select_kernel(device, dtype)[0] == "sm90" else "sm80"


def cutlass_unavailable_reason(x: torch.Tensor, meta_format: str = "sm80") -> str | None:
    """Why no CUTLASS kernel runs input ``x`` with metadata in ``meta_format`` (None when one does)."""
    kernel, reason = select_kernel(x.device, x.dtype)
    if kernel is None:
        return reason
    if kernel != meta_format:
        return (f"the metadata is in the {meta_format} layout but this GPU runs the {kernel} kernel; move the module "
                "with .to(device) (SparseLinear converts) or convert with wanda_kernels.sparse24.meta_"
                f"{meta_format}_to_{kernel}")
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"SparseLinear runs dense F.linear on the decompressed weight: {reason}", RuntimeWarning,
                  stacklevel=3)


def launch_sparse24_gemm(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, d: torch.Tensor) -> None:
    """sm80 kernel: ``d = W @ xb.T``; no padding, no validation beyond CUTLASS's own.

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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _sm90_workspace_bytes(dtype_code: int, config: int, m: int, n: int, k: int, sm_count: int) -> int:
    return extension().sm90_workspace_size(dtype_code, config, m, n, k, sm_count)


def launch_sparse24_sm90(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, y: torch.Tensor,
                         bias: torch.Tensor | None, config: str | None = None) -> None:
    """sm90a kernel: ``y = xb @ W.T (+ bias)``; no padding, no validation beyond CUTLASS's own.

    Args:
        values: ``(M_pad, K/2)``; meta: sm90 layout (``meta_shape(M_pad, K, "sm90")``) int16.
        xb: ``(N, K)`` row-major (row stride a multiple of 8), on the weight's CUDA device.
        y: ``(N, M)`` output of ``xb``'s dtype, row stride a multiple of 8; ``M % 8 == 0``,
            ``M <= M_pad``: the first M rows of the weight are used.
        bias: ``(M,)`` of ``xb``'s dtype, 16-byte aligned, or None.
        config: a key of ``SM90_CONFIGS``; None picks by :func:`sm90_config_for`.
    """
    ext = extension()
    m, n, k = y.shape[1], xb.shape[0], 2 * values.shape[1]
    sms = _sm_count(xb.device.index if xb.device.index is not None else torch.cuda.current_device())
    if config is None:
        config = sm90_config_for(n, m, sms)
    code, cfg = _DTYPE_CODE[xb.dtype], SM90_CONFIGS[config]
    ws_bytes = _sm90_workspace_bytes(code, cfg, m, n, k, sms)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=xb.device) if ws_bytes else None
    with torch.cuda.device(xb.device):
        status = ext.sm90_gemm(
            code, cfg, m, n, k, values.data_ptr(), meta.data_ptr(), xb.data_ptr(), xb.stride(0), y.data_ptr(),
            y.stride(0), 0 if bias is None else bias.data_ptr(), 0 if workspace is None else workspace.data_ptr(),
            sms, torch.cuda.current_stream(xb.device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"CUTLASS sm90a 2:4 sparse GEMM failed ({ext.status_string(status)}): weight {m}x{k}, "
                           f"input {n}x{k}, {xb.dtype}, config {config}")


def _padded_input(x2d: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """``x2d`` itself when the kernels can read it in place, else a zero-padded copy ``(n_pad, k_pad)``."""
    n, in_features = x2d.shape
    if n_pad != n or k_pad != in_features or x2d.stride(1) != 1 or x2d.stride(0) % 8 or x2d.data_ptr() % 16:
        xb = x2d.new_zeros(n_pad, k_pad)
        xb[:n, :in_features] = x2d
        return xb
    return x2d


def _cutlass_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    """sm80 kernel: ``y = x @ W.T (+ bias)``; pads tokens and in_features as needed."""
    in_features = x.shape[-1]
    m_pad, k_pad = values.shape[0], 2 * values.shape[1]
    x2d = x.reshape(-1, in_features)
    n = x2d.shape[0]
    y = torch.empty(n, out_features, dtype=x.dtype, device=x.device)
    if n == 0:
        return y.reshape(*x.shape[:-1], out_features)
    xb = _padded_input(x2d, _round_up(n, _TOKEN_MULTIPLE), k_pad)
    d = torch.empty(m_pad, xb.shape[0], dtype=x.dtype, device=x.device)  # D = W @ x^T, (out, tokens)
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


def _sm90_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int) -> torch.Tensor:
    """sm90a kernel: ``y = x @ W.T (+ bias)``, y written row-major by the kernel, bias in its epilogue.

    Tokens are never padded (TMA clips the ragged tile); in_features is padded only when
    it is not the weight's padded K, and out_features only when it is not a multiple of 8.
    """
    in_features = x.shape[-1]
    k_pad = 2 * values.shape[1]
    x2d = x.reshape(-1, in_features)
    n = x2d.shape[0]
    m = _round_up(out_features, 8)
    y = torch.empty(n, m, dtype=x.dtype, device=x.device)
    if n == 0:
        return y[:, :out_features].reshape(*x.shape[:-1], out_features)
    xb = _padded_input(x2d, n, k_pad)
    if bias is not None:
        bias = bias.to(x.dtype)  # the epilogue reads the bias as the output's element type
        if m != out_features or bias.data_ptr() % 16 or not bias.is_contiguous():
            bias = torch.cat([bias.reshape(-1), bias.new_zeros(m - out_features)])
    try:
        launch_sparse24_sm90(values, meta, xb, y, bias)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (SparseLinear {in_features} -> {out_features}, input of {n} tokens)") from exc
    if m != out_features:
        y = y[:, :out_features].contiguous()
    return y.reshape(*x.shape[:-1], out_features)


# Optional[...], not "X | None": torch evaluates these annotations to infer the op's
# schema, and must be able to on Python 3.9.
@torch.library.custom_op("wanda_kernels::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
                    out_features: int, meta_format: str = "sm80") -> torch.Tensor:
    """``x (..., in) -> (..., out_features)`` with a compressed 2:4 weight (see SparseLinear)."""
    reason = cutlass_unavailable_reason(x, meta_format)
    if reason is None:
        if meta_format == "sm90":
            return _sm90_linear(x, values, meta, bias, out_features)
        return _cutlass_linear(x, values, meta, bias, out_features)
    _warn_once(reason)
    weight = decompress_24(values, meta, meta_format=meta_format)[:out_features, : x.shape[-1]]
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, values, meta, bias, out_features, meta_format="sm80"):
    return x.new_empty(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W stored 2:4-compressed (CUTLASS format).

    Buffers: ``values`` ``(M, K/2)``, ``meta`` int16 and ``bias`` ``(out_features,)`` or
    None, where ``M`` and ``K`` are ``out_features`` and ``in_features`` rounded up to
    multiples of 32 and 64 (the kernels' granularity; the padding is zeros and invisible
    from outside). ``meta`` is in the layout ``meta_format`` names: ``"sm80"``,
    ``(M, K/16)``, or on a compute capability 9.0 GPU with the sm90a kernels built,
    ``"sm90"``, ``meta_shape(M, K, "sm90")``. ``state_dict`` always stores ``"sm80"``.

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
        self.meta_format = "sm80"
        self._sync_meta_format()

    # -- metadata layout follows the device ---------------------------------------------

    def _meta_as(self, meta_format: str) -> torch.Tensor:
        """``self.meta`` converted to ``meta_format`` (the buffer itself when it already is)."""
        if meta_format == self.meta_format:
            return self.meta
        m, k = self.values.shape[0], 2 * self.values.shape[1]
        convert = meta_sm80_to_sm90 if meta_format == "sm90" else meta_sm90_to_sm80
        return convert(self.meta, m, k)

    def _sync_meta_format(self) -> None:
        """Put ``meta`` in the layout of the kernel that will run on the module's device."""
        target = _meta_format_for(self.values.device, self.values.dtype)
        if target != self.meta_format:
            self.meta = self._meta_as(target)
            self.meta_format = target

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .cpu(), .half() ... all end here; convert after the move.
        result = super()._apply(fn, *args, **kwargs)
        self._sync_meta_format()
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.meta_format != "sm80":  # checkpoints hold the portable (PyTorch) layout
            destination[prefix + "meta"] = self._meta_as("sm80").detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The incoming meta is sm80: load into an sm80 buffer, then convert for the device.
        if self.meta_format != "sm80":
            self.meta = self._meta_as("sm80")
            self.meta_format = "sm80"
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._sync_meta_format()

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
        module.meta_format = "sm80"
        module._sync_meta_format()
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
        return decompress_24(self.values, self.meta, meta_format=self.meta_format)[
            : self.out_features, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects input (..., {self.in_features}); got {tuple(x.shape)}")
        if x.dtype != self.values.dtype:
            raise TypeError(f"SparseLinear holds {self.values.dtype} weights; got input of {x.dtype}")
        if x.device != self.values.device:
            raise ValueError(f"input is on {x.device} but SparseLinear is on {self.values.device}")
        return torch.ops.wanda_kernels.sparse24_linear(x, self.values, self.meta, self.bias, self.out_features,
                                                       self.meta_format)

    def backend(self) -> str:
        """What ``forward`` runs for inputs on this module's device."""
        probe = torch.empty(0, dtype=self.values.dtype, device=self.values.device)
        reason = cutlass_unavailable_reason(probe, self.meta_format)
        if reason is None:
            return {"sm90": "cutlass-sm90a (wgmma.sp)", "sm80": "cutlass-sm80 (mma.sp)"}[self.meta_format]
        return f"dense fallback ({reason.split(';')[0]})"

    def extra_repr(self) -> str:
        padded = tuple(self.values.shape[:1]) + (2 * self.values.shape[1],)
        pad = "" if padded == (self.out_features, self.in_features) else f", padded={padded}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}{pad}, values={tuple(self.values.shape)}, meta={tuple(self.meta.shape)} "
                f"{self.meta_format}, "
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
