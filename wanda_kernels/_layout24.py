"""Where the 2:4 format puts things: padding, the stored pair, code packing, both metadata layouts.

The one definition of the format's layout, used by :mod:`wanda_kernels.sparse24` (the
product) and by :mod:`wanda_kernels.reference` (the tests' oracle). The Triton kernel
``kernels/prune_compress.py`` computes the same placements in registers; the tests
check it against these. Two outside oracles pin the layouts themselves: PyTorch's
``to_sparse_semi_structured`` packer (sm80, ``tests/test_sparse24.py``) and CUTLASS's
own ``fill_layoutE`` evaluated on the CPU (sm90, ``tests/cpp/sm90_meta_layout.cpp``).

For a 2:4 weight ``(M, K)``:

* ``values (M, K/2)``: the two stored elements of every group of 4, in column order;
* the **code** of a group is ``idx0 | idx1 << 2``, ``idx0 < idx1`` the positions (0..3)
  of its two stored elements (:func:`stored_pair`);
* a **plain word** ``(row, c)`` is the int16 holding the codes of columns
  ``16c .. 16c+15`` of a row, group ``t`` at bits ``4t`` (:func:`pack_codes`);
* **sm80** (CUTLASS 2.x ``SparseGemm``, also PyTorch's layout): ``(M, K/16)`` int16, the
  plain words reordered (:func:`sm80_offsets`);
* **sm90** (CUTLASS 3.x ``Sm90GemmSparseConfig::fill_layoutE``): the same words padded to
  ``(round_up(M, 64), round_up(K, 128) / 16)`` and placed by :func:`sm90_offsets`, the
  padding holding code 0xE (positions 2, 3: the code of an all-zero group).

Both layouts keep the four codes of a plain word together, so converting between them
is a permutation of words (:func:`plain_words`, :func:`meta_from_plain`).
"""

from __future__ import annotations

import functools

import torch

DTYPES_24 = (torch.float16, torch.bfloat16)
ROW_MULTIPLE = 32  # sm80 metadata rows are reordered in blocks of 32
COL_MULTIPLE = 64  # the GEMMs' tile K; also makes the metadata columns even
META_FORMATS = ("sm80", "sm90")
SM90_ROW_MULTIPLE = 64  # the fill_layoutE atom is 64 rows x 128 columns
SM90_COL_MULTIPLE = 128
FILL_CODE = 0xE  # the code of a group with no non-zero: positions 2 and 3
FILL_WORD = -0x1112  # four fill codes, 0xEEEE, as a signed int16

# Index tensors are cached per (shape, device): a layer shape of a 70B model costs
# ~120 MB of int64 indices, so only a few shapes are kept.
_INDEX_CACHE = 8


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def to_int16(x: torch.Tensor) -> torch.Tensor:
    """Integers holding 16-bit patterns -> int16 with the same bits (two's complement)."""
    return (((x & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)


def meta_shape(m: int, k: int, meta_format: str = "sm80") -> tuple[int, int]:
    """Shape of the int16 metadata of a padded ``(M, K)`` weight in ``meta_format``."""
    if meta_format == "sm90":
        return round_up(m, SM90_ROW_MULTIPLE), round_up(k, SM90_COL_MULTIPLE) // 16
    return m, k // 16


def stored_pair(nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored positions ``(idx0, idx1)`` of every group from its non-zero flags ``(..., 4)`` bool.

    The non-zero positions, filled up (when fewer than two) with position 2, then 3:
    ``[x,0,0,0] -> (0,2)``, ``[0,x,0,0] -> (1,2)``, ``[0,0,x,0] -> (2,3)``,
    ``[0,0,0,x] -> (2,3)``, ``[0,0,0,0] -> (2,3)``: CUTLASS's and PyTorch's choice.
    Groups with more than two non-zeros are the caller's to reject.
    """
    pos = torch.arange(4, device=nonzero.device)
    count = nonzero.sum(-1)
    first = torch.where(nonzero, pos, 4).amin(-1)
    last = torch.where(nonzero, pos, -1).amax(-1)
    single_low = (count == 1) & (first < 2)
    idx0 = torch.where(count == 2, first, torch.where(single_low, first, 2))
    idx1 = torch.where(count == 2, last, torch.where(single_low, 2, 3))
    return idx0, idx1


def pack_codes(idx0: torch.Tensor, idx1: torch.Tensor) -> torch.Tensor:
    """Plain words ``(M, K/16)`` int16 from the stored positions of every group ``(M, K/4)``."""
    m, groups = idx0.shape
    codes = (idx0 | (idx1 << 2)).reshape(m, groups // 4, 4)
    plain = codes[..., 0] | (codes[..., 1] << 4) | (codes[..., 2] << 8) | (codes[..., 3] << 12)
    return to_int16(plain)


def unpack_codes(plain: torch.Tensor, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_codes`: ``(idx0, idx1)`` int64 ``(M, K/4)`` from plain words (any shape)."""
    words = plain.reshape(m, k // 16).to(torch.int32) & 0xFFFF
    codes = torch.stack([(words >> (4 * t)) & 0xF for t in range(4)], dim=-1).reshape(m, k // 4).long()
    return codes & 0x3, codes >> 2


def sm80_offsets(m: int, meta_cols: int) -> torch.Tensor:
    """Storage offset of every plain word ``(row, col)`` in the sm80 layout; int64 ``(m, meta_cols)``, CPU.

    Rows are reordered within blocks of 32 (``r -> 32*(r//32) + 4*(r%8) + (r%32)//8``),
    then 2x2 blocks of (row, column) are swizzled from Z to N order (CUTLASS
    ``tools/util/host_reorder.h``, ``reorder_meta``), and the result is stored
    ``ColumnMajorInterleaved<2>``: element (row, col) at
    ``(col // 2) * (2 * m) + 2 * row + col % 2`` (CUTLASS ``layout/matrix.h``).
    """
    rows = torch.arange(m)[:, None].expand(m, meta_cols)
    cols = torch.arange(meta_cols)[None, :].expand(m, meta_cols)
    dst_row = rows // 32 * 32 + (rows % 8) * 4 + (rows % 32) // 8
    dst_col = cols.clone()
    z_to_n = (dst_row % 2 == 0) & (dst_col % 2 == 1)
    n_to_z = (dst_row % 2 == 1) & (dst_col % 2 == 0)
    dst_row, dst_col = dst_row + z_to_n.long() - n_to_z.long(), dst_col - z_to_n.long() + n_to_z.long()
    return (dst_col // 2) * (2 * m) + dst_row * 2 + dst_col % 2


def sm90_offsets(m: int, k: int) -> torch.Tensor:
    """Logical offset in the sm90 E of the first element of every group of 4; int64 ``(M64, K128 / 4)``, CPU.

    ``m, k``: the weight's rows and columns (any; they are rounded up to 64 and 128).
    E is tiled by a 64 x 128 atom of 8192 logical elements, stacked along M first (atom
    stride 8192), then along K (stride ``M64 * 128``). Inside the atom, for
    ``m = m0 + 8*m1 + 16*m2`` and ``k = k0 + 16*k1 + 32*k2`` (``m0 < 8, m1 < 2, m2 < 4,
    k0 < 16, k1 < 2, k2 < 4``)::

        offset = k0 + 16*m1 + 32*k2 + 128*m0 + 1024*k1 + 2048*m2

    Each byte of E covers 8 logical elements, so group ``(m, k/4)`` lives in byte
    ``offset // 8``, low nibble when ``offset % 8 == 0``, high nibble when it is 4.
    """
    m64, k128 = round_up(m, SM90_ROW_MULTIPLE), round_up(k, SM90_COL_MULTIPLE)
    r = torch.arange(m64)[:, None]
    c = 4 * torch.arange(k128 // 4)[None, :]
    m0, m1, m2, mb = r % 8, (r // 8) % 2, (r // 16) % 4, r // 64
    k0, k1, k2, kb = c % 16, (c // 16) % 2, (c // 32) % 4, c // 128
    in_atom = k0 + 16 * m1 + 32 * k2 + 128 * m0 + 1024 * k1 + 2048 * m2
    return in_atom + 8192 * mb + (m64 * 128) * kb


@functools.lru_cache(maxsize=_INDEX_CACHE)
def _sm80_gather_index(m: int, meta_cols: int, device: torch.device) -> torch.Tensor:
    """sm80 storage position s -> index of the plain word stored there."""
    return torch.argsort(sm80_offsets(m, meta_cols).reshape(-1)).to(device)


@functools.lru_cache(maxsize=_INDEX_CACHE)
def _sm90_word_index(m: int, k: int, device: torch.device) -> torch.Tensor:
    """Plain word ``(row, c)`` -> its index among the int16 words of the sm90 E; ``(m * k/16,)``."""
    return (sm90_offsets(m, k)[:m, 0 : k // 4 : 4] // 16).reshape(-1).to(device)


def plain_words(meta: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Flat plain words ``(m * k/16,)`` int16 from ``meta`` in ``meta_format`` (a padded ``(m, k)`` weight)."""
    if meta_format == "sm90":
        return meta.reshape(-1)[_sm90_word_index(m, k, meta.device)]
    plain = torch.empty(m * (k // 16), dtype=torch.int16, device=meta.device)
    plain[_sm80_gather_index(m, k // 16, meta.device)] = meta.reshape(-1)
    return plain


def meta_from_plain(plain: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Inverse of :func:`plain_words`: the metadata tensor in ``meta_format``, on ``plain.device``."""
    if meta_format == "sm90":
        e = filled_meta(m, k, "sm90", plain.device).reshape(-1)
        e[_sm90_word_index(m, k, plain.device)] = plain.reshape(-1)
        return e.reshape(meta_shape(m, k, "sm90"))
    return plain.reshape(-1)[_sm80_gather_index(m, k // 16, plain.device)].reshape(m, k // 16)


def filled_meta(m: int, k: int, meta_format: str, device=None) -> torch.Tensor:
    """Metadata of an all-zero padded ``(m, k)`` weight: every word four fill codes (any layout)."""
    return torch.full(meta_shape(m, k, meta_format), FILL_WORD, dtype=torch.int16, device=device)
