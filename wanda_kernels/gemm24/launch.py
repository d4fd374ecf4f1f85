"""Raw launches of the CUTLASS 2:4 GEMMs of ``_C``: tensors to pointers, workspace, status to exception.

No padding and no validation beyond the extension's own pointer and size checks
(``ValueError``) and CUTLASS's ``can_implement``: callers pass operands that
:mod:`wanda_kernels.gemm24.op` (or their own code) already shaped.
"""

from __future__ import annotations

import functools

import torch

from .loader import extension
from .policy import sm80_config_for, sm90_config_for

__all__ = ["launch_sm80", "launch_sm90", "sm_count"]


@functools.cache
def _enums(ext) -> tuple[dict, dict, dict]:
    """torch dtype -> _C.DType, and configuration name -> _C.Sm80Config / _C.Sm90Config."""
    dtypes = {torch.float16: ext.DType.float16, torch.bfloat16: ext.DType.bfloat16}
    return dtypes, dict(ext.Sm80Config.__members__), dict(ext.Sm90Config.__members__)


@functools.cache
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index`` (cached: the persistent schedulers need it per launch)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


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
    ext = extension()
    dtypes, configs, _ = _enums(ext)
    m_pad, k_pad, n_pad = values.shape[0], 2 * values.shape[1], xb.shape[0]
    config = config or sm80_config_for(n_pad)
    with torch.cuda.device(xb.device):
        status = ext.sm80_gemm(
            dtypes[xb.dtype], configs[config], m_pad, n_pad, k_pad, values.data_ptr(), meta.data_ptr(),
            xb.data_ptr(), xb.stride(0), d.data_ptr(), d.stride(0), torch.cuda.current_stream(xb.device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"CUTLASS sm80 2:4 sparse GEMM failed ({ext.status_string(status)}): weight padded to "
                           f"{m_pad}x{k_pad}, input padded to {n_pad}x{k_pad}, {xb.dtype}, config {config}")


@functools.lru_cache(maxsize=1024)
def _sm90_workspace_bytes(dtype, config, m: int, n: int, k: int, sms: int) -> int:
    return extension().sm90_workspace_size(dtype, config, m, n, k, sms)


def launch_sm90(values: torch.Tensor, meta: torch.Tensor, xb: torch.Tensor, y: torch.Tensor,
                bias: torch.Tensor | None = None, config: str | None = None) -> None:
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
    """
    ext = extension()
    dtypes, _, configs = _enums(ext)
    m, n, k = y.shape[1], xb.shape[0], 2 * values.shape[1]
    sms = sm_count(xb.device.index if xb.device.index is not None else torch.cuda.current_device())
    config = config or sm90_config_for(n, m, sms)
    dtype, cfg = dtypes[xb.dtype], configs[config]
    ws_bytes = _sm90_workspace_bytes(dtype, cfg, m, n, k, sms)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=xb.device) if ws_bytes else None
    with torch.cuda.device(xb.device):
        status = ext.sm90_gemm(
            dtype, cfg, m, n, k, values.data_ptr(), meta.data_ptr(), xb.data_ptr(), xb.stride(0), y.data_ptr(),
            y.stride(0), 0 if bias is None else bias.data_ptr(), 0 if workspace is None else workspace.data_ptr(),
            sms, torch.cuda.current_stream(xb.device).cuda_stream)
    if status != 0:
        raise RuntimeError(f"CUTLASS sm90a 2:4 sparse GEMM failed ({ext.status_string(status)}): weight {m}x{k}, "
                           f"input {n}x{k}, {xb.dtype}, config {config}")
