"""The bitmap format for unstructured sparsity: compress, decompress, the chunk offset table, checks.

For a weight ``(out, in)`` and a keep-mask of the same shape:

* ``bitmap (out, ceil(in / 32))`` int32: bit ``b`` of word ``w`` of a row (``(word >> b)
  & 1``) says whether column ``32 w + b`` is kept. Bits past ``in`` are zero.
* ``values``: the kept weights of every row, in column order, float16 or bfloat16.
  When every row keeps the same number ``nnz_row`` (Wanda's unstructured and N:M
  masks do, by construction) it is ``(out, nnz_row)`` and nothing else is needed;
  otherwise (per-layer magnitude, a mask from another tool) it is 1-D, all rows one
  after another, and ``row_offsets (out + 1,)`` int64 says where each row starts.

Bytes, for 16-bit values at sparsity ``s``: ``(1 - s) + 1/16`` of the dense weight
(0.5625 at 50%), plus ``8 (out + 1)`` for unequal rows.

The kernels do not read ``row_offsets``: they read the **chunk offset table**
(:func:`chunk_offsets`), ``(out, ceil(in / CHUNK_COLS))`` int32, the index into the
flattened ``values`` of the first kept weight of every chunk of ``CHUNK_COLS`` columns
of every row. It is derived from the bitmap when a module is built or loaded (never
stored) and lets a kernel start anywhere a chunk starts (split-K) without counting the
bits before it; it costs 4 bytes per 1024 columns (0.2% of the dense fp16 weight).
``wanda_kernels.reference`` has plain twins of everything here.
"""

from __future__ import annotations

import torch

from ._validation import check_positive_int

__all__ = [
    "compress_bitmap",
    "decompress_bitmap",
    "nonzero_mask",
    "bitmap_mask",
    "chunk_offsets",
    "check_bitmap",
    "check_bitmap_data",
    "bitmap_nbytes",
    "bitmap_words",
    "table_chunks",
    "DTYPES_BITMAP",
    "WORD_BITS",
    "CHUNK_COLS",
]

DTYPES_BITMAP = (torch.float16, torch.bfloat16)
WORD_BITS = 32
CHUNK_COLS = 1024  # columns per entry of the chunk offset table: a multiple of every kernel's BLOCK_K
_INT32_LIMIT = 2**31 - 1  # the chunk table indexes the values with int32


def bitmap_words(in_features: int) -> int:
    """Words per row of the bitmap: ``ceil(in_features / 32)``."""
    return -(-in_features // WORD_BITS)


def table_chunks(in_features: int) -> int:
    """Columns of the chunk offset table: ``ceil(in_features / CHUNK_COLS)``."""
    return -(-in_features // CHUNK_COLS)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(out, in)`` -> int32 ``(out, ceil(in / 32))``, bit b of word w = column 32 w + b."""
    out, in_features = mask.shape
    words = bitmap_words(in_features)
    padded = mask.new_zeros(out, words * WORD_BITS)
    padded[:, :in_features] = mask
    bits = padded.view(out, words, WORD_BITS)
    packed = torch.zeros(out, words, dtype=torch.int64, device=mask.device)
    for b in range(WORD_BITS):  # 32 passes over (out, words) int64, not one (out, in, 32)-sized temporary
        packed |= bits[:, :, b].to(torch.int64) << b
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement wrap


def bitmap_mask(bitmap: torch.Tensor, in_features: int) -> torch.Tensor:
    """The keep-mask ``(out, in_features)`` bool of a bitmap ``(out, ceil(in_features / 32))`` int32."""
    out, words = bitmap.shape
    wide = bitmap.to(torch.int64)
    bits = torch.empty(out, words, WORD_BITS, dtype=torch.bool, device=bitmap.device)
    for b in range(WORD_BITS):
        bits[:, :, b] = ((wide >> b) & 1).bool()
    return bits.view(out, words * WORD_BITS)[:, :in_features]


def _popcount(bitmap: torch.Tensor) -> torch.Tensor:
    """Set bits of every int32 word, as int64 (SWAR popcount on the 32-bit pattern)."""
    x = bitmap.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    """The keep-mask ``compress_bitmap`` uses without one: ``(out, in)`` bool, weight's device.

    The non-zeros of ``weight (out, in)``, and, when rows hold different counts, zeros
    too (each short row's first ones) up to the largest count, if those extra values
    take no more bytes than the ``row_offsets`` they spare (``8 (out + 1)``). A pruned
    model's zeros cannot be told from kept weights that are exactly 0 (common in
    dequantised models), so this gives such rows back their equal counts; masks with
    truly unequal rows (per-layer magnitude) keep their offsets. The dense weight is the
    same either way: a kept zero and a pruned one decompress alike.
    """
    mask = weight != 0
    counts = mask.sum(dim=1)
    deficit = counts.max() - counts
    if int(deficit.sum()) * weight.element_size() > 8 * (weight.shape[0] + 1):
        return mask
    zero_rank = torch.cumsum(~mask, dim=1, dtype=torch.int32)  # 1, 2, ... at a row's 1st, 2nd, ... zero
    return mask | (~mask & (zero_rank <= deficit[:, None]))


def compress_bitmap(weight: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Compress ``weight`` into the bitmap format.

    Args:
        weight: ``(out, in)`` float16/bfloat16, CPU or CUDA, any strides.
        mask: ``(out, in)`` bool on the weight's device, True where a weight is kept
            (a kept weight may be zero: its place is kept too, so rows keep their
            counts). None: :func:`nonzero_mask`, the non-zeros (a -0.0 counts as zero),
            plus zeros kept to give every row the same count where that is smaller than
            row offsets (a pruned model's kept weight that happens to be 0).

    Returns:
        ``(values, bitmap, row_offsets)``, contiguous on the weight's device:
        ``values (out, nnz_row)`` and ``row_offsets`` None when every row keeps the same
        number, else ``values (nnz,)`` and ``row_offsets (out + 1,)`` int64;
        ``bitmap (out, ceil(in / 32))`` int32. ``decompress_bitmap`` gives back
        ``weight`` where ``mask`` is True (bit for bit, -0.0 included) and +0.0 elsewhere.

    Raises:
        TypeError, ValueError: naming ``weight`` or ``mask`` and what they are.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty 2-D tensor (out_features, in_features); got shape "
                         f"{_shape(weight)}")
    if weight.dtype not in DTYPES_BITMAP:
        raise TypeError(f"weight must be float16 or bfloat16 for the bitmap format; got {weight.dtype}. Convert the "
                        "model first, e.g. model.half() or model.to(torch.bfloat16)")
    weight = weight.detach()
    if mask is None:
        mask = nonzero_mask(weight)
    else:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None; got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = kept); got {mask.dtype}")
        if mask.shape != weight.shape:
            raise ValueError(f"mask has shape {_shape(mask)} but weight has shape {_shape(weight)}")
        if mask.device != weight.device:
            raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
    counts = mask.sum(dim=1)
    values = weight[mask]  # row by row, in column order
    if values.numel() > _INT32_LIMIT:
        raise ValueError(f"weight keeps {values.numel()} values; the bitmap format indexes them with int32 "
                         f"(at most {_INT32_LIMIT})")
    bitmap = _pack(mask)
    lo, hi = torch.aminmax(counts)
    if int(lo) == int(hi):
        return values.view(weight.shape[0], int(hi)).contiguous(), bitmap, None
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    return values.contiguous(), bitmap, row_offsets


def check_bitmap(values, bitmap, in_features: int, row_offsets=None, *, unequal_rows: bool | None = None
                 ) -> tuple[int, int]:
    """Shapes, dtypes and devices of a bitmap-format weight (no data read); returns ``(out, nnz)``.

    ``values``: float16/bfloat16, ``(out, nnz_row)`` with ``row_offsets`` None, else 1-D;
    ``bitmap``: int32 ``(out, ceil(in_features / 32))``; ``row_offsets``: int64
    ``(out + 1,)`` or None; all on one device and contiguous. ``unequal_rows`` (default:
    whether ``row_offsets`` is given) says which form ``values`` must have; the kernels,
    which read the chunk table instead of the offsets, pass it without them.
    """
    if unequal_rows is None:
        unequal_rows = row_offsets is not None
    check_positive_int("in_features", in_features)
    for name, t in (("bitmap", bitmap), ("values", values), ("row_offsets", row_offsets)):
        if t is None and name == "row_offsets":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.device != bitmap.device:
            raise ValueError(f"{name} is on {t.device} but bitmap is on {bitmap.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; got strides {t.stride()}")
    if bitmap.dtype != torch.int32 or bitmap.dim() != 2 or bitmap.shape[1] != bitmap_words(in_features):
        raise ValueError(f"bitmap for in_features={in_features} must be int32 of shape (out_features, "
                         f"{bitmap_words(in_features)}); got {bitmap.dtype} {_shape(bitmap)}")
    out = bitmap.shape[0]
    if values.dtype not in DTYPES_BITMAP:
        raise TypeError(f"values must be float16 or bfloat16; got {values.dtype}")
    if row_offsets is not None and (row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (out + 1,)):
        raise ValueError(f"row_offsets must be int64 of shape ({out + 1},); got {row_offsets.dtype} "
                         f"{_shape(row_offsets)}")
    if not unequal_rows:
        if values.dim() != 2 or values.shape[0] != out or values.shape[1] > in_features:
            raise ValueError(f"values must be (out_features, nnz_row) = ({out}, <= {in_features}) when row_offsets "
                             f"is None (every row keeps the same count); got {_shape(values)}")
    elif values.dim() != 1:
        raise ValueError(f"values must be 1-D (all rows' kept weights) with row_offsets; got {_shape(values)}")
    if values.numel() > _INT32_LIMIT:
        raise ValueError(f"values holds {values.numel()} weights; the format indexes at most {_INT32_LIMIT}")
    return out, values.numel()


def check_bitmap_data(values, bitmap, in_features: int, row_offsets=None) -> None:
    """:func:`check_bitmap`, then the data (one host read): every row's set bits equal its
    count of values, ``row_offsets`` starts at 0 and ends at ``values.numel()``, and no bit
    is set past ``in_features``. For loading: a damaged or mismatched file fails here, not
    in a kernel reading out of bounds.
    """
    out, nnz = check_bitmap(values, bitmap, in_features, row_offsets)
    bits = _popcount(bitmap).sum(dim=1)
    if row_offsets is None:
        want = torch.full_like(bits, values.shape[1])
        ends_ok = torch.ones((), dtype=torch.bool, device=bits.device)
    else:
        want = row_offsets[1:] - row_offsets[:-1]
        ends_ok = (row_offsets[0] == 0) & (row_offsets[-1] == nnz)
    tail = in_features % WORD_BITS
    if tail:
        stray = (bitmap[:, -1].to(torch.int64) & 0xFFFFFFFF) >> tail
        tail_ok = (stray == 0).all()
    else:
        tail_ok = torch.ones((), dtype=torch.bool, device=bits.device)
    rows_ok = bits == want
    rows_good, ends_good, tail_good = torch.stack([rows_ok.all(), ends_ok, tail_ok]).tolist()  # the one host read
    if not ends_good:
        raise ValueError(f"row_offsets must start at 0 and end at values.numel() = {nnz}; got "
                         f"{int(row_offsets[0])} .. {int(row_offsets[-1])}")
    if not rows_good:
        row = int((~rows_ok).nonzero()[0, 0])
        raise ValueError(f"bitmap row {row} has {int(bits[row])} set bits but {int(want[row])} values are stored for "
                         "it: values and bitmap do not belong together")
    if not tail_good:
        raise ValueError(f"bitmap has bits set past in_features={in_features} (in its last word)")


def decompress_bitmap(values: torch.Tensor, bitmap: torch.Tensor, in_features: int,
                      row_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`compress_bitmap`: the dense ``(out, in_features)`` weight of ``values``' dtype.

    Args: as :func:`compress_bitmap` returns them, on one device, and the layer's
    ``in_features``. Checks the data first (:func:`check_bitmap_data`).
    """
    check_bitmap_data(values, bitmap, in_features, row_offsets)
    return _dense(values, bitmap, in_features)


def _dense(values: torch.Tensor, bitmap: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight, without checks (for operands that are right by construction)."""
    mask = bitmap_mask(bitmap, in_features)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)  # row by row, in column order: the order they were stored in
    return dense


def chunk_offsets(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The chunk offset table ``(out, ceil(in / CHUNK_COLS))`` int32 of a bitmap-format weight.

    Entry ``(r, c)`` is the index, in ``values.reshape(-1)``, of row ``r``'s first kept
    weight at or after column ``c * CHUNK_COLS`` (where it would be, when it keeps none
    there). On the bitmap's device, no host synchronisation. Operands as returned by
    :func:`compress_bitmap` (checked by the caller).
    """
    out, words = bitmap.shape
    per_chunk = CHUNK_COLS // WORD_BITS
    n_chunks = -(-words // per_chunk)  # = table_chunks(in_features)
    counts = torch.zeros(out, n_chunks * per_chunk, dtype=torch.int64, device=bitmap.device)
    counts[:, :words] = _popcount(bitmap)
    counts = counts.view(out, n_chunks, per_chunk).sum(dim=2)
    if row_offsets is None:
        starts = torch.arange(out, dtype=torch.int64, device=bitmap.device) * values.shape[1]
    else:
        starts = row_offsets[:-1]
    table = starts[:, None] + torch.cumsum(counts, dim=1) - counts  # exclusive prefix sum along the row
    return table.to(torch.int32).contiguous()


def bitmap_nbytes(values: torch.Tensor, bitmap: torch.Tensor, row_offsets: torch.Tensor | None = None) -> int:
    """Bytes of the stored format: values, bitmap and row offsets (the chunk table is derived, not stored)."""
    total = values.numel() * values.element_size() + bitmap.numel() * bitmap.element_size()
    return total + (row_offsets.numel() * row_offsets.element_size() if row_offsets is not None else 0)
