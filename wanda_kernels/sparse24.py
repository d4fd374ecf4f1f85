"""The 2:4 compressed format of CUTLASS's sparse GEMMs: compress, decompress, convert, fused prune+compress.

For a 2:4 weight ``(M, K)``, ``values (M, K/2)`` holds the two stored elements of every
group of 4 and ``meta`` int16 their positions, 4 bits per group, in the layout of the
kernel that reads it: ``meta_format="sm80"``, ``(M, K/16)``, the reordered, interleaved
layout of ``cutlass::gemm::device::SparseGemm`` and of PyTorch's
``to_sparse_semi_structured`` CUTLASS backend, bit for bit; or ``"sm90"``, CUTLASS 3.x's
``fill_layoutE`` for Hopper's sparse wgmma, padded to ``(round_up(M, 64),
round_up(K, 128) / 16)``. ``values`` are the same for both; converting the metadata is a
permutation of words (:func:`meta_sm80_to_sm90`, :func:`meta_sm90_to_sm80`).
``wanda_kernels/_layout24.py`` defines where each layout puts what.
"""

from __future__ import annotations

import torch

from . import _torch_impl
from ._backend import resolve_backend
from ._layout24 import (
    COL_MULTIPLE,
    DTYPES_24,
    META_FORMATS,
    ROW_MULTIPLE,
    filled_meta,
    meta_from_plain,
    meta_shape,
    pack_codes,
    plain_words,
    round_up,
    stored_pair,
    unpack_codes,
)
from ._validation import BACKENDS, FUSED_24_METRICS, check_choice, check_positive_int, check_score_inputs

__all__ = [
    "compress_24",
    "decompress_24",
    "prune_compress_24",
    "is_24_sparse",
    "check_24_sparse",
    "meta_sm80_to_sm90",
    "meta_sm90_to_sm80",
    "meta_shape",
    "padded_shape",
]


def padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """The ``(M, K)`` a ``(out_features, in_features)`` weight is zero-padded to for the 2:4 format."""
    check_positive_int("out_features", out_features)
    check_positive_int("in_features", in_features)
    return round_up(out_features, ROW_MULTIPLE), round_up(in_features, COL_MULTIPLE)


def _check_24_weight(weight, name: str = "weight") -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features); got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES_24:
        raise TypeError(f"{name} must be float16 or bfloat16 for the 2:4 format; got {weight.dtype}")
    m, k = weight.shape
    if m % ROW_MULTIPLE or k % COL_MULTIPLE or m == 0 or k == 0:
        raise ValueError(f"{name} of shape {(m, k)}: the 2:4 format needs out_features % {ROW_MULTIPLE} == 0 and "
                         f"in_features % {COL_MULTIPLE} == 0 (SparseLinear pads other shapes)")


def _nonzeros_per_group(weight: torch.Tensor) -> torch.Tensor:
    """``(rows, cols/4)``: non-zeros in every group of 4 consecutive columns."""
    return (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)


def is_24_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((_nonzeros_per_group(weight) <= 2).all())


def check_24_sparse(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError naming the first row and group with more than 2 non-zeros."""
    if weight.shape[1] % 4:
        raise ValueError(f"{name} has in_features={weight.shape[1]}, not a multiple of 4: it cannot be 2:4 sparse")
    counts = _nonzeros_per_group(weight)
    bad = counts > 2
    if bool(bad.any()):
        row, group = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name} is not 2:4 sparse: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has "
            f"{int(counts[row, group])} non-zeros; prune it first, e.g. wanda_kernels.prune_(layer, norms, "
            "pattern='2:4')"
        )


def _check_meta(meta, out_features: int, in_features: int, meta_format: str) -> tuple[int, int]:
    """Validate ``meta`` for a layer ``(out_features, in_features)``; returns the padded ``(M, K)``."""
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor; got {type(meta).__name__}")
    m, k = padded_shape(out_features, in_features)
    want = meta_shape(m, k, meta_format)
    if meta.dtype != torch.int16 or tuple(meta.shape) != want:
        raise ValueError(f"meta in the {meta_format} format for a ({out_features}, {in_features}) weight (padded to "
                         f"({m}, {k})) must be int16 of shape {want}; got {meta.dtype} {tuple(meta.shape)}")
    return m, k


def meta_sm80_to_sm90(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Metadata of the sm80 kernel (and PyTorch) -> the layout of the sm90a (Hopper) kernel.

    Args:
        meta: ``(M, K/16)`` int16 from :func:`compress_24`, CPU or CUDA, where ``M`` and
            ``K`` are ``out_features`` and ``in_features`` rounded up to 32 and 64.
        out_features, in_features: the layer's shape.

    Returns:
        ``(round_up(M, 64), round_up(K, 128) / 16)`` int16 on ``meta.device``: the words
        of CUTLASS's ``fill_layoutE``, padding words filled with code 0xE (positions 2, 3).
        One gather, no host synchronisation.
    """
    m, k = _check_meta(meta, out_features, in_features, "sm80")
    return meta_from_plain(plain_words(meta, m, k, "sm80"), m, k, "sm90")


def meta_sm90_to_sm80(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`meta_sm80_to_sm90`: sm90 E -> ``(M, K/16)`` int16, PyTorch's layout."""
    m, k = _check_meta(meta, out_features, in_features, "sm90")
    return meta_from_plain(plain_words(meta, m, k, "sm90"), m, k, "sm80")


def compress_24(weight: torch.Tensor, *, meta_format: str = "sm80") -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 sparse weight into CUTLASS's sparse-GEMM format.

    Args:
        weight: ``(M, K)`` float16/bfloat16, CPU or CUDA, with at most two non-zeros in
            every group of 4 consecutive columns; ``M % 32 == 0``, ``K % 64 == 0``.
        meta_format: ``"sm80"`` (the sm80 kernel's and PyTorch's layout) or ``"sm90"``
            (the Hopper kernel's, see :func:`meta_sm80_to_sm90`).

    Returns:
        ``values``: ``(M, K/2)`` of ``weight.dtype``; ``meta``: ``(M, K/16)`` int16 in
        CUTLASS's reordered layout (``meta_shape(M, K, "sm90")`` for sm90). Both
        contiguous, on ``weight.device``.

    Raises:
        TypeError, ValueError: for another dtype or shape, or a group with more than two
        non-zeros (naming its row and group).
    """
    _check_24_weight(weight)
    check_choice("meta_format", meta_format, META_FORMATS)
    check_24_sparse(weight)
    m, k = weight.shape
    groups = weight.reshape(m, k // 4, 4)
    idx0, idx1 = stored_pair(groups != 0)
    values = torch.stack((groups.gather(2, idx0[..., None]), groups.gather(2, idx1[..., None])), dim=-1)
    return values.reshape(m, k // 2).contiguous(), meta_from_plain(pack_codes(idx0, idx1), m, k, meta_format)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, *, meta_format: str = "sm80") -> torch.Tensor:
    """Inverse of :func:`compress_24`.

    Args:
        values: ``(M, K/2)`` float16/bfloat16.
        meta: ``(M, K/16)`` int16 in CUTLASS's layout, on the same device
            (``meta_shape(M, K, "sm90")`` with ``meta_format="sm90"``).
        meta_format: ``"sm80"`` or ``"sm90"``.

    Returns:
        The dense ``(M, K)`` weight, zeros where nothing is stored.
    """
    if not isinstance(values, torch.Tensor) or not isinstance(meta, torch.Tensor):
        raise TypeError("values and meta must be torch.Tensors")
    if values.dim() != 2 or values.dtype not in DTYPES_24:
        raise ValueError(f"values must be 2-D float16/bfloat16 (M, K/2); got {values.dtype} {tuple(values.shape)}")
    check_choice("meta_format", meta_format, META_FORMATS)
    m, half_k = values.shape
    k = 2 * half_k
    want = meta_shape(m, k, meta_format)
    if meta.dtype != torch.int16 or tuple(meta.shape) != want:
        raise ValueError(f"meta ({meta_format}) must be int16 of shape {want} for values of shape "
                         f"{tuple(values.shape)}; got {meta.dtype} {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"meta is on {meta.device} but values are on {values.device}")
    if m % ROW_MULTIPLE or k % COL_MULTIPLE:
        raise ValueError(f"values of shape {tuple(values.shape)} do not come from an (M, K) weight with "
                         f"M % {ROW_MULTIPLE} == 0 and K % {COL_MULTIPLE} == 0")
    pos = torch.stack(unpack_codes(plain_words(meta, m, k, meta_format), m, k), dim=-1)
    dense = torch.zeros(m, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, pos, values.reshape(m, k // 4, 2))
    return dense.reshape(m, k)


def prune_compress_24(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    *,
    metric: str = "wanda",
    meta_format: str = "sm80",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda 2:4 pruning straight into the compressed format, without touching ``weight``.

    Equal, bit for bit, to ``w = weight.clone(); prune_(w, norms, pattern="2:4",
    metric=metric); compress_24(w, meta_format=meta_format)``. On CUDA one Triton
    kernel reads W once and writes only the values and the metadata, in either layout
    (no dense masked copy, no conversion pass).

    Args:
        weight: ``(M, K)`` float16/bfloat16, ``M % 32 == 0``, ``K % 64 == 0``, any strides.
        norms: ``(K,)`` ``||X_j||_2`` per input feature on the weight's device (None
            with ``metric="magnitude"``).
        metric: ``"wanda"`` or ``"magnitude"``.
        meta_format: ``"sm80"`` or ``"sm90"`` (see :func:`compress_24`).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``(values (M, K/2), meta)`` as :func:`compress_24`.
    """
    _check_24_weight(weight)
    check_choice("metric", metric, FUSED_24_METRICS)
    check_choice("meta_format", meta_format, META_FORMATS)
    check_choice("backend", backend, BACKENDS)
    norms32 = check_score_inputs(weight, norms, metric)
    if metric == "magnitude":
        norms32 = None
    chosen = resolve_backend(backend, weight.device)
    m, k = weight.shape
    with torch.no_grad():
        if chosen == "triton":
            from .kernels.prune_compress import launch_prune_compress_24

            values = torch.empty(m, k // 2, dtype=weight.dtype, device=weight.device)
            if meta_format == "sm90":  # padding words are not written by the kernel
                meta = filled_meta(m, k, "sm90", weight.device)
            else:
                meta = torch.empty(m, k // 16, dtype=torch.int16, device=weight.device)
            launch_prune_compress_24(weight, norms32, values, meta, meta_format)
            return values, meta
        keep = _torch_impl.keep_nm(weight, norms32, 2, 4)
        return compress_24(weight.masked_fill(~keep, 0), meta_format=meta_format)
