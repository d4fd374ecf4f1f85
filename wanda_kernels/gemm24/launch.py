"""Raw launches of the CUTLASS 2:4 GEMMs of ``_C``: tensors to pointers, workspace, status to exception.

No padding and no validation beyond the extension's own pointer and size checks
(``ValueError``) and CUTLASS's ``can_implement``: callers pass operands that
:mod:`wanda_kernels.gemm24.op` (or their own code) already shaped.

The host work per launch is kept small, because a decode-sized GEMM runs for only a few
microseconds: what depends only on the device (the extension, its enums, the SM count)
is looked up once per device and cached (:class:`_Device`); per call there are the
configuration lookup (cached per shape), the schedule lookup, one current-stream query,
and one call into ``_C``. Nothing here synchronises with the GPU, so a launch can be
captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from .loader import extension
from .policy import SM90_RASTERS, Sm90Schedule, sm80_config_for, sm90_config_for, sm90_schedule_for

__all__ = ["launch_sm80", "launch_sm90", "sm_count"]


@functools.cache
def _enums(ext) -> tuple[dict, dict, dict, dict]:
    """torch dtype -> _C.DType, configuration name -> _C.Sm80Config / _C.Sm90Config, raster -> _C.Sm90Raster."""
    dtypes = {torch.float16: ext.DType.float16, torch.bfloat16: ext.DType.bfloat16}
    rasters = {name: getattr(ext.Sm90Raster, name) for name in SM90_RASTERS}
    return dtypes, dict(ext.Sm80Config.__members__), dict(ext.Sm90Config.__members__), rasters


@functools.cache
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (cached: the persistent schedulers need it per launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _raw_stream_query():
    """A function ``index -> cudaStream_t`` (as an int) of the current stream of CUDA device ``index``.

    torch's CUDA builds have ``torch._C._cuda_getCurrentRawStream`` (what Triton's
    launcher calls): an integer, no Python ``Stream`` object built per call. Elsewhere,
    the public ``torch.cuda.current_stream``.
    """
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


class _Device:
    """What a launch on one CUDA device needs that never changes: ``_C``, its enums, the SM count.

    ``call(fn, *args)`` runs ``fn`` with this device current (``_C`` launches on the
    current device and reads its id there), switching only when another one is.
    """

    def __init__(self, index: int):
        self.index = index
        self.ext = extension()
        self.dtypes, self.sm80_configs, self.sm90_configs, self.sm90_rasters = _enums(self.ext)
        self.sms = sm_count(index)
        self.stream = functools.partial(_raw_stream_query(), index)

    def call(self, fn, *args):
        if torch.cuda.current_device() == self.index:
            return fn(*args)
        with torch.cuda.device(self.index):
            return fn(*args)


@functools.lru_cache(maxsize=64)
def _device(index: int) -> _Device:
    return _Device(index)


def _device_of(t: torch.Tensor) -> _Device:
    index = t.device.index
    return _device(index if index is not None else torch.cuda.current_device())


def launch_sm80(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, d: torch.Tensor,
                config: str | None = None) -> None:
    """sm80 kernel: ``d = W @ xb.T``, on the current stream of ``xb``'s device.

    Args:
        values: ``(M, K/2)`` float16/bfloat16; meta: ``(M, K/16)`` int16, sm80 layout
            (M % 32 == 0, K % 64 == 0: a padded weight).
        xb: ``(N, K)`` activations of the weight's dtype, row-major, ``N % 8 == 0``, on the
            weight's CUDA device.
        d: ``(M, N)`` output of ``xb``'s dtype, row stride a multiple of 8.
        config: ``"decode"`` or ``"large"``; None picks by :func:`~.policy.sm80_config_for`.
    """
    dev = _device_of(xb)
    m_pad, k_pad, n_pad = values.shape[0], 2 * values.shape[1], xb.shape[0]
    config = config or sm80_config_for(n_pad)
    status = dev.call(dev.ext.sm80_gemm, dev.dtypes[xb.dtype], dev.sm80_configs[config], m_pad, n_pad, k_pad,
                      values.data_ptr(), meta.data_ptr(), xb.data_ptr(), xb.stride(0), d.data_ptr(), d.stride(0),
                      dev.stream())
    if status != 0:
        raise RuntimeError(f"CUTLASS sm80 2:4 sparse GEMM failed ({dev.ext.status_string(status)}): weight padded to "
                           f"{m_pad}x{k_pad}, input padded to {n_pad}x{k_pad}, {xb.dtype}, config {config}")


@functools.lru_cache(maxsize=1024)
def _sm90_workspace_bytes(dtype, config, m: int, n: int, k: int, sms: int, swizzle: int, raster, splits: int) -> int:
    return extension().sm90_workspace_size(dtype, config, m, n, k, sms, swizzle, raster, splits)


def launch_sm90(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, y: torch.Tensor,
                bias: torch.Tensor | None = None, config: str | None = None,
                schedule: Sm90Schedule | None = None) -> None:
    """sm90a kernel: ``y = xb @ W.T (+ bias)``, on the current stream of ``xb``'s device.

    Args:
        values: ``(M_pad, K/2)`` float16/bfloat16; meta: sm90 layout
            (``meta_shape(M_pad, K, "sm90")``) int16.
        xb: ``(N, K)`` of the weight's dtype, row-major (row stride a multiple of 8), on the
            weight's CUDA device.
        y: ``(N, M)`` output of ``xb``'s dtype, row stride a multiple of 8; ``M % 8 == 0``,
            ``M <= M_pad``: the first M rows of the weight are used.
        bias: ``(M,)`` of ``xb``'s dtype, 16-byte aligned, or None.
        config: one of ``SM90_CONFIGS``; None picks by :func:`~.policy.sm90_config_for`.
        schedule: the persistent scheduler's tile order (:class:`~.policy.Sm90Schedule`);
            None picks by :func:`~.policy.sm90_schedule_for`.
    """
    dev = _device_of(xb)
    m, n, k = y.shape[1], xb.shape[0], 2 * values.shape[1]
    config = config or sm90_config_for(n, m, dev.sms)
    schedule = schedule or sm90_schedule_for(config, n, m, k, dev.sms)
    dtype, cfg, raster = dev.dtypes[xb.dtype], dev.sm90_configs[config], dev.sm90_rasters[schedule.raster]
    ws_bytes = _sm90_workspace_bytes(dtype, cfg, m, n, k, dev.sms, schedule.swizzle, raster, schedule.splits)
    # A new workspace per call (stream-K and split-K only), from the caching allocator: a
    # cached one would be shared by launches on different streams.
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=xb.device) if ws_bytes else None
    status = dev.call(dev.ext.sm90_gemm, dtype, cfg, m, n, k, values.data_ptr(), meta.data_ptr(), xb.data_ptr(),
                      xb.stride(0), y.data_ptr(), y.stride(0), 0 if bias is None else bias.data_ptr(),
                      0 if workspace is None else workspace.data_ptr(), dev.sms, dev.stream(), schedule.swizzle,
                      raster, schedule.splits)
    if status != 0:
        raise RuntimeError(f"CUTLASS sm90a 2:4 sparse GEMM failed ({dev.ext.status_string(status)}): weight {m}x{k}, "
                           f"input {n}x{k}, {xb.dtype}, config {config}, {schedule}")
