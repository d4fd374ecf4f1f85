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

import torch

DTYPES_24 = (torch.float16, torch.bfloat16)
ROW_MULTIPLE = 32  # sm80 metadata rows are reordered in blocks of 32
COL_MULTIPLE = 64  # the GEMMs' tile K; also makes the metadata columns even
META_FORMATS = ("sm80", "sm90")
SM90_ROW_MULTIPLE = 64  # the fill_layoutE atom is 64 rows x 128 columns
SM90_COL_MULTIPLE = 128
FILL_CODE = 0xE  # the code of a group with no non-zero: positions 2 and 3
FILL_WORD = -0x1112  # four fill codes, 0xEEEE, as a signed int16


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


def _stored_pair_of(bits: int) -> tuple[int, int]:
    """The stored pair of a group whose non-zero positions are the set bits of ``bits`` (0..15)."""
    nonzero = [p for p in range(4) if bits >> p & 1]
    if len(nonzero) == 2:
        return nonzero[0], nonzero[1]
    if len(nonzero) == 1 and nonzero[0] < 2:
        return nonzero[0], 2
    return 2, 3  # one non-zero at 2 or 3, none, or more than two (rejected by the callers)


_PAIR_TABLE = [_stored_pair_of(bits) for bits in range(16)]


def stored_pair(nonzero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored positions ``(idx0, idx1)`` int64 of every group from its non-zero flags ``(..., 4)`` bool.

    The non-zero positions, filled up (when fewer than two) with position 2, then 3:
    ``[x,0,0,0] -> (0,2)``, ``[0,x,0,0] -> (1,2)``, ``[0,0,x,0] -> (2,3)``,
    ``[0,0,0,x] -> (2,3)``, ``[0,0,0,0] -> (2,3)``: CUTLASS's and PyTorch's choice.
    Groups with more than two non-zeros are the caller's to reject.

    The 4 flags of a group form a 4-bit pattern, looked up in a 16-entry table: one
    pass, where a min/max over the group costs several (and is slow on CPU).
    """
    weights = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=nonzero.device)
    bits = (nonzero.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8).long()
    table = torch.tensor(_PAIR_TABLE, dtype=torch.long, device=nonzero.device)  # (16, 2)
    pair = table[bits]
    return pair[..., 0], pair[..., 1]


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


def _index_dtype(n: int) -> torch.dtype:
    """int32 for index tensors whose values stay below 2**31 (every real layer), else int64."""
    return torch.int32 if n < 2**31 else torch.int64


def sm80_offsets(m: int, meta_cols: int, device=None) -> torch.Tensor:
    """Storage offset of every plain word ``(row, col)`` in the sm80 layout; ``(m, meta_cols)`` on ``device``.

    int32 (int64 for a layer of more than 2**31 words): computed where it is used, in a
    few elementwise passes, so nothing is cached on the GPU.

    Rows are reordered within blocks of 32 (``r -> 32*(r//32) + 4*(r%8) + (r%32)//8``),
    then 2x2 blocks of (row, column) are swizzled from Z to N order (CUTLASS
    ``tools/util/host_reorder.h``, ``reorder_meta``), and the result is stored
    ``ColumnMajorInterleaved<2>``: element (row, col) at
    ``(col // 2) * (2 * m) + 2 * row + col % 2`` (CUTLASS ``layout/matrix.h``).
    """
    idx = _index_dtype(m * meta_cols)
    rows = torch.arange(m, dtype=idx, device=device)[:, None]
    cols = torch.arange(meta_cols, dtype=idx, device=device)[None, :]
    dst_row = rows // 32 * 32 + (rows % 8) * 4 + (rows % 32) // 8  # (m, 1)
    # Z -> N within 2 x 2 blocks: even rows take odd columns down a row, odd rows take even
    # columns up a row (and the columns move the other way).
    swap = (dst_row % 2 == 0) & (cols % 2 == 1) | (dst_row % 2 == 1) & (cols % 2 == 0)  # (m, meta_cols)
    step = (1 - 2 * (dst_row % 2)) * swap  # +1 for Z -> N, -1 for N -> Z, 0 elsewhere
    dst_row, dst_col = dst_row + step, cols - step
    return (dst_col // 2) * (2 * m) + dst_row * 2 + dst_col % 2


def sm90_offsets(m: int, k: int, device=None, groups=None) -> torch.Tensor:
    """Logical offset in the sm90 E of the first element of every group of 4; ``(M64, K128 / 4)`` on ``device``.

    ``m, k``: the weight's rows and columns (any; they are rounded up to 64 and 128).
    E is tiled by a 64 x 128 atom of 8192 logical elements, stacked along M first (atom
    stride 8192), then along K (stride ``M64 * 128``). Inside the atom, for
    ``m = m0 + 8*m1 + 16*m2`` and ``k = k0 + 16*k1 + 32*k2`` (``m0 < 8, m1 < 2, m2 < 4,
    k0 < 16, k1 < 2, k2 < 4``)::

        offset = k0 + 16*m1 + 32*k2 + 128*m0 + 1024*k1 + 2048*m2

    Each byte of E covers 8 logical elements, so group ``(m, k/4)`` lives in byte
    ``offset // 8``, low nibble when ``offset % 8 == 0``, high nibble when it is 4.

    ``groups``: only the first ``m`` rows and every ``groups``-th group (4: the first
    group of each plain word), ``(m, k / (4 * groups))``. int32 (int64 past 2**31).
    """
    m64, k128 = round_up(m, SM90_ROW_MULTIPLE), round_up(k, SM90_COL_MULTIPLE)
    idx = _index_dtype(m64 * k128)
    rows, step = (m64, 1) if groups is None else (m, groups)
    r = torch.arange(rows, dtype=idx, device=device)[:, None]
    c = 4 * step * torch.arange((k128 if groups is None else k) // (4 * step), dtype=idx, device=device)[None, :]
    m0, m1, m2, mb = r % 8, (r // 8) % 2, (r // 16) % 4, r // 64
    k0, k1, k2, kb = c % 16, (c // 16) % 2, (c // 32) % 4, c // 128
    in_atom = k0 + 16 * m1 + 32 * k2 + 128 * m0 + 1024 * k1 + 2048 * m2
    return in_atom + 8192 * mb + (m64 * 128) * kb


def _word_index(m: int, k: int, meta_format: str, device) -> torch.Tensor:
    """Plain word ``(row, c)`` -> its index among the int16 words of ``meta_format``; ``(m * k/16,)`` on ``device``.

    Computed per call (elementwise, on ``device``), not cached: for a 70B layer it is
    15 M entries, and a cache of them per shape would hold hundreds of MB of GPU memory.
    """
    if meta_format == "sm90":
        return (sm90_offsets(m, k, device, groups=4) // 16).reshape(-1)
    return sm80_offsets(m, k // 16, device).reshape(-1)


def plain_words(meta: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Flat plain words ``(m * k/16,)`` int16 from ``meta`` in ``meta_format`` (a padded ``(m, k)`` weight)."""
    return meta.reshape(-1)[_word_index(m, k, meta_format, meta.device)]


def meta_from_plain(plain: torch.Tensor, m: int, k: int, meta_format: str) -> torch.Tensor:
    """Inverse of :func:`plain_words`: the metadata tensor in ``meta_format``, on ``plain.device``."""
    meta = filled_meta(m, k, meta_format, plain.device)  # sm90: padding words hold fill codes
    meta.reshape(-1)[_word_index(m, k, meta_format, plain.device)] = plain.reshape(-1)
    return meta


def filled_meta(m: int, k: int, meta_format: str, device=None) -> torch.Tensor:
    """Metadata of an all-zero padded ``(m, k)`` weight: every word four fill codes (any layout)."""
    return torch.full(meta_shape(m, k, meta_format), FILL_WORD, dtype=torch.int16, device=device)
