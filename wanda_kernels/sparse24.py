"""The 2:4 compressed format of CUTLASS's sparse GEMM: compress, decompress, fused prune+compress.

Format (``wanda_kernels.reference`` spells it out): for a 2:4 weight ``(M, K)``,
``values (M, K/2)`` holds the two stored elements of every group of 4 and
``meta (M, K/16)`` int16 their positions, 4 bits per group, in the reordered,
interleaved layout that ``cutlass::gemm::device::SparseGemm`` reads. It is the format
of PyTorch's ``to_sparse_semi_structured`` CUTLASS backend, bit for bit.

Hopper's sparse wgmma kernels (CUTLASS 3.x, sm90a) read the same ``values`` and the same
4-bit codes, at other places: ``meta_format="sm90"`` gives CUTLASS's
``Sm90GemmSparseConfig::fill_layoutE`` layout, padded to ``(round_up(M, 64),
round_up(K, 128) / 16)`` int16 words. Both layouts keep the four codes of 16
consecutive columns of a row together in one little-endian 16-bit word, so converting
is a permutation of words (:func:`meta_sm80_to_sm90`, :func:`meta_sm90_to_sm80`).
"""

from __future__ import annotations

import functools

import torch

from . import _torch_impl
from ._backend import resolve_backend
from ._validation import check_choice, check_norms
from .reference import (
    SM90_META_COL_MULTIPLE,
    SM90_META_FILL,
    SM90_META_ROW_MULTIPLE,
    meta_reorder_offsets,
    meta_sm90_offsets,
)

__all__ = [
    "compress_24",
    "decompress_24",
    "prune_compress_24",
    "is_24_sparse",
    "check_24_sparse",
    "meta_sm80_to_sm90",
    "meta_sm90_to_sm80",
    "meta_shape",
]

DTYPES_24 = (torch.float16, torch.bfloat16)
ROW_MULTIPLE = 32  # metadata rows are reordered in blocks of 32
COL_MULTIPLE = 64  # the GEMM's threadblock K; also makes the metadata columns even
META_FORMATS = ("sm80", "sm90")
_SM90_FILL_WORD = SM90_META_FILL * 0x1111 - 0x10000  # four fill codes, as a signed int16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def meta_shape(m: int, k: int, meta_format: str = "sm80") -> tuple[int, int]:
    """Shape of the int16 metadata of a padded ``(M, K)`` weight in ``meta_format``."""
    if meta_format == "sm90":
        return _round_up(m, SM90_META_ROW_MULTIPLE), _round_up(k, SM90_META_COL_MULTIPLE) // 16
    return m, k // 16


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


@functools.lru_cache(maxsize=64)
def _meta_gather_index(m: int, meta_cols: int, device: torch.device) -> torch.Tensor:
    """Storage position s -> plain (row-major) index of the metadata element stored there."""
    offsets = meta_reorder_offsets(m, meta_cols).reshape(-1)
    return torch.argsort(offsets).to(device)


@functools.lru_cache(maxsize=64)
def _meta_sm90_index(m: int, k: int, device: torch.device) -> torch.Tensor:
    """Plain (row-major) metadata word ``(row, col)`` -> its index in the flat sm90 E; ``(m * k/16,)``."""
    words = meta_sm90_offsets(m, k)[:m, 0 : k // 4 : 4] // 16  # the word of columns 16c..16c+15
    return words.reshape(-1).to(device)


# Both layouts are permutations of the same "plain" words: word (row, c) holds the four
# codes of columns 16c..16c+15 of that row. These two helpers are the only places that
# know where each layout puts a word.


def _plain_words(meta: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Flat plain words ``(m * k/16,)`` int16 from ``meta`` in ``meta_format`` (a padded ``(m, k)`` weight)."""
    if meta_format == "sm90":
        return meta.reshape(-1)[_meta_sm90_index(m, k, meta.device)]
    plain = torch.empty(m * (k // 16), dtype=torch.int16, device=meta.device)
    plain[_meta_gather_index(m, k // 16, meta.device)] = meta.reshape(-1)
    return plain


def _meta_from_plain(plain: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Inverse of :func:`_plain_words`: the metadata tensor in ``meta_format``."""
    if meta_format == "sm90":
        e_rows, e_cols = meta_shape(m, k, "sm90")
        e = torch.full((e_rows * e_cols,), _SM90_FILL_WORD, dtype=torch.int16, device=plain.device)
        e[_meta_sm90_index(m, k, plain.device)] = plain
        return e.reshape(e_rows, e_cols)
    return plain[_meta_gather_index(m, k // 16, plain.device)].reshape(m, k // 16)


def _check_meta(meta, out_features: int, in_features: int, meta_format: str) -> tuple[int, int]:
    """Validate ``meta`` for a layer ``(out_features, in_features)``; returns the padded ``(M, K)``."""
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor; got {type(meta).__name__}")
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    m, k = _round_up(out_features, ROW_MULTIPLE), _round_up(in_features, COL_MULTIPLE)
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
    return _meta_from_plain(_plain_words(meta, m, k, "sm80"), m, k, "sm90")


def meta_sm90_to_sm80(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`meta_sm80_to_sm90`: sm90 E -> ``(M, K/16)`` int16, PyTorch's layout."""
    m, k = _check_meta(meta, out_features, in_features, "sm90")
    return _meta_from_plain(_plain_words(meta, m, k, "sm90"), m, k, "sm80")


def _pairs(nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored positions (idx0, idx1) per group from its non-zero flags ``(..., 4)``.

    The non-zero positions, filled up with position 2, then 3 (reference.pair_24).
    """
    pos = torch.arange(4, device=nonzero.device)
    count = nonzero.sum(-1)
    first = torch.where(nonzero, pos, 4).amin(-1)
    last = torch.where(nonzero, pos, -1).amax(-1)
    single_low = (count == 1) & (first < 2)
    idx0 = torch.where(count == 2, first, torch.where(single_low, first, 2))
    idx1 = torch.where(count == 2, last, torch.where(single_low, 2, 3))
    return idx0, idx1


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
    idx0, idx1 = _pairs(groups != 0)
    values = torch.stack((groups.gather(2, idx0[..., None]), groups.gather(2, idx1[..., None])), dim=-1)
    codes = (idx0 | (idx1 << 2)).reshape(m, k // 16, 4)
    plain = codes[..., 0] | (codes[..., 1] << 4) | (codes[..., 2] << 8) | (codes[..., 3] << 12)
    plain16 = (((plain & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)  # 16-bit pattern, two's complement
    return values.reshape(m, k // 2).contiguous(), _meta_from_plain(plain16.reshape(-1), m, k, meta_format)


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
    plain = _plain_words(meta, m, k, meta_format).to(torch.int32) & 0xFFFF
    nib = torch.stack([(plain >> (4 * t)) & 0xF for t in range(4)], dim=-1).reshape(m, k // 4)
    pos = torch.stack((nib & 0x3, nib >> 2), dim=-1).long()
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
    check_choice("metric", metric, ("wanda", "magnitude"))
    check_choice("meta_format", meta_format, META_FORMATS)
    norms32 = check_norms(norms, weight, metric)
    if metric == "magnitude":
        norms32 = None
    chosen = resolve_backend(backend, weight.device)
    m, k = weight.shape
    with torch.no_grad():
        if chosen == "triton":
            from .kernels.prune_compress import launch_prune_compress_24

            values = torch.empty(m, k // 2, dtype=weight.dtype, device=weight.device)
            if meta_format == "sm90":  # padding words are not written by the kernel
                meta = torch.full(meta_shape(m, k, "sm90"), _SM90_FILL_WORD, dtype=torch.int16, device=weight.device)
            else:
                meta = torch.empty(m, k // 16, dtype=torch.int16, device=weight.device)
            launch_prune_compress_24(weight, norms32, values, meta, meta_format)
            return values, meta
        keep = _torch_impl.keep_nm(weight, norms32, 2, 4)
        return compress_24(weight.masked_fill(~keep, 0), meta_format=meta_format)
