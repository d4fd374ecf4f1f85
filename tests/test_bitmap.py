"""The bitmap format for unstructured sparsity: format, Triton kernel (interpreter), BitmapLinear, sparsify_."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRETING
from hypothesis import given, settings
from hypothesis import strategies as st

import wanda_kernels as wk
from wanda_kernels import _warn, bitmap, reference
from wanda_kernels.bitmap_op import check_operands, kernel_linear

DTYPES = [torch.float16, torch.bfloat16]


def _weight(out, in_, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, in_, generator=g).to(dtype)


def _mask(out, in_, seed=0, density=0.5, equal=True):
    """A random keep-mask: exactly round(density * in) per row when ``equal``, else Bernoulli."""
    g = torch.Generator().manual_seed(seed + 1)
    if not equal:
        return torch.rand(out, in_, generator=g) < density
    keep = round(density * in_)
    order = torch.rand(out, in_, generator=g).argsort(dim=1)
    return order < keep


def _pruned_linear(in_, out, dtype, sparsity=0.5, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_, out, bias=bias).to(dtype)
    wk.prune_(lin, torch.rand(in_) + 0.1, sparsity)
    return lin


# ---------------------------------------------------------------------------
# The format


def test_hand_computed_rows():
    # Row 0 keeps columns 0, 3, 33 (words 0b1001 = 9 and 0b10 = 2); row 1 keeps 31, 32, 39
    # (bit 31 alone is -2**31 as a signed int32; word 1 is 0b10000001 = 129). 40 columns:
    # the second word is partial. Equal counts (3 each): values (2, 3), no row offsets.
    w = torch.zeros(2, 40, dtype=torch.float16)
    w[0, [0, 3, 33]] = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16)
    w[1, [31, 32, 39]] = torch.tensor([4.0, 5.0, -6.0], dtype=torch.float16)
    values, bits, offsets = wk.compress_bitmap(w)
    assert bits.dtype == torch.int32 and bits.tolist() == [[9, 2], [-(2**31), 129]]
    assert values.tolist() == [[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]] and offsets is None
    assert torch.equal(wk.decompress_bitmap(values, bits, 40), w)
    # Unequal counts (the mask says so): one more weight in row 1 -> 1-D values and row
    # offsets [0, 3, 7]. (Without a mask, row 0 would keep a zero instead: next test.)
    w[1, 2] = 7.0
    values, bits, offsets = wk.compress_bitmap(w, w != 0)
    assert values.tolist() == [1.0, -2.0, 3.0, 7.0, 4.0, 5.0, -6.0] and offsets.tolist() == [0, 3, 7]
    assert bits[1].tolist() == [-(2**31) + 4, 129]
    assert torch.equal(wk.decompress_bitmap(values, bits, 40, offsets), w)
    # The chunk table of a 40-column weight has one chunk: each row's start.
    assert bitmap.chunk_offsets(bits, values, offsets).tolist() == [[0], [3]]


def test_without_a_mask_short_rows_keep_zeros_when_that_is_smaller():
    # Rows of 3, 4, 4 non-zeros in 8 columns: padding row 0 with its first zero (column 1)
    # costs 2 bytes, row offsets 8 * 4 = 32: every row keeps 4, values (3, 4), no offsets.
    w = torch.zeros(3, 8, dtype=torch.float16)
    w[0, [0, 2, 5]] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    w[1, [1, 2, 3, 4]] = 4.0
    w[2, [0, 1, 6, 7]] = 5.0
    values, bits, offsets = wk.compress_bitmap(w)
    assert offsets is None and values.tolist()[0] == [1.0, 0.0, 2.0, 3.0]
    assert bits[:, 0].tolist() == [0b100111, 0b11110, 0b11000011]
    assert torch.equal(wk.decompress_bitmap(values, bits, 8), w)
    for impl in (bitmap.nonzero_mask, reference.bitmap_nonzero_mask):
        assert impl(w).sum(dim=1).tolist() == [4, 4, 4]
    # Three rows of 1 against one of 12 (in 40 columns): 33 padded values (66 bytes) cost
    # more than 5 offsets (40 bytes): the non-zeros only, with row offsets.
    w = torch.zeros(4, 40, dtype=torch.float16)
    w[:3, 7] = 1.0
    w[3, :12] = 2.0
    values, bits, offsets = wk.compress_bitmap(w)
    assert offsets.tolist() == [0, 1, 2, 3, 15] and values.shape == (15,)
    for impl in (bitmap.nonzero_mask, reference.bitmap_nonzero_mask):
        assert torch.equal(impl(w), w != 0)
    # Rows of 1, 5, 5 and 4: 9 padded values (18 bytes) against 40: padded to 5 each.
    w[1:3, :4] = 3.0
    w[3, 4:] = 0.0
    values, _, offsets = wk.compress_bitmap(w)
    assert offsets is None and values.shape == (4, 5)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 8), in_=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       density=st.sampled_from([0.1, 0.5, 0.9]), seed=st.integers(0, 2**16))
def test_nonzero_mask_pads_by_the_byte_rule(out, in_, dtype, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = _weight(out, in_, dtype, seed) * (torch.rand(out, in_, generator=g) < density)
    mask = bitmap.nonzero_mask(w)
    assert torch.equal(mask, reference.bitmap_nonzero_mask(w))
    assert bool((mask | (w == 0)).all()) and bool(mask[w != 0].all())  # every non-zero kept; only zeros added
    counts = (w != 0).sum(dim=1)
    padding_bytes = int((counts.max() - counts).sum()) * w.element_size()
    equal = bool((mask.sum(dim=1) == mask.sum(dim=1)[0]).all())
    assert equal == (padding_bytes <= 8 * (out + 1))
    values, bits, offsets = wk.compress_bitmap(w)
    assert (offsets is None) == equal
    back = wk.decompress_bitmap(values, bits, in_, offsets)
    assert torch.equal(back, w)  # the same weight (a kept -0.0 keeps its sign, a pruned one is +0.0)
    assert torch.equal(back.view(torch.int16), torch.where(mask, w, torch.zeros_like(w)).view(torch.int16))


def test_a_kept_zero_keeps_its_place():
    # With a mask, a kept weight that is 0 (or -0.0) is stored: rows keep equal counts.
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0], [-0.0, 3.0, 0.0, 4.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]])
    values, bits, offsets = wk.compress_bitmap(w, mask)
    assert offsets is None and values.shape == (2, 2) and bits.tolist() == [[3], [9]]
    back = wk.decompress_bitmap(values, bits, 4)
    assert torch.equal(back.view(torch.int16), torch.where(mask, w, torch.zeros_like(w)).view(torch.int16))
    assert back[1, 0].view(torch.int16) == w[1, 0].view(torch.int16)  # -0.0 survives, bit for bit


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 6), in_=st.integers(1, 100), dtype=st.sampled_from(DTYPES),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), equal=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_and_reference_twin(out, in_, dtype, density, equal, seed):
    w = _weight(out, in_, dtype, seed)
    w[0, 0] = -0.0  # a signed zero in every example, kept or not
    mask = _mask(out, in_, seed, density, equal)
    values, bits, offsets = wk.compress_bitmap(w, mask)
    ref_values, ref_bits, ref_offsets = reference.compress_bitmap(w, mask)
    assert torch.equal(bits, ref_bits)
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))
    assert (offsets is None) == (ref_offsets is None) == bool((mask.sum(1) == mask.sum(1)[0]).all())
    if offsets is not None:
        assert torch.equal(offsets, ref_offsets)
    expected = torch.where(mask, w, torch.zeros_like(w))
    for back in (wk.decompress_bitmap(values, bits, in_, offsets),
                 reference.decompress_bitmap(values, bits, in_, offsets)):
        assert torch.equal(back.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(bitmap.bitmap_mask(bits, in_), mask)
    assert torch.equal(bitmap.chunk_offsets(bits, values, offsets),
                       reference.chunk_offsets(values, bits, in_, offsets))


@pytest.mark.parametrize("equal", [True, False])
def test_chunk_table_across_several_chunks(equal):
    # 2100 columns: 3 chunks of 1024; the table's entries are each row's running counts.
    w = _weight(5, 2100, torch.float16, seed=3)
    mask = _mask(5, 2100, seed=3, density=0.4, equal=equal)
    values, bits, offsets = wk.compress_bitmap(w, mask)
    table = bitmap.chunk_offsets(bits, values, offsets)
    assert table.shape == (5, 3) and table.dtype == torch.int32
    assert torch.equal(table, reference.chunk_offsets(values, bits, 2100, offsets))
    starts = torch.arange(5) * values.shape[1] if equal else offsets[:-1]
    by_hand = torch.stack([starts, starts + mask[:, :1024].sum(1), starts + mask[:, :2048].sum(1)], dim=1)
    assert torch.equal(table.long(), by_hand)


@pytest.mark.parametrize("sparsity", [0.5, 0.625, 0.75])  # s * 256 whole: the formula is exact
def test_storage_is_one_minus_s_plus_one_sixteenth(sparsity):
    # Wanda's per-row count: equal rows, no offsets; 16-bit values + 1 bit per weight.
    lin = _pruned_linear(256, 64, torch.float16, sparsity)
    values, bits, offsets = wk.compress_bitmap(lin.weight)
    assert offsets is None and values.shape == (64, round(256 * (1 - sparsity)))
    dense_bytes = 64 * 256 * 2
    assert bitmap.bitmap_nbytes(values, bits, offsets) / dense_bytes == (1 - sparsity) + 1 / 16
    assert wk.BitmapLinear.from_linear(lin).nbytes() == bitmap.bitmap_nbytes(values, bits, offsets)


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda w: wk.compress_bitmap(w.float()), TypeError, r"weight must be float16 or bfloat16 .* got torch\.float32"),
    (lambda w: wk.compress_bitmap(w[0]), ValueError, r"weight must be a non-empty 2-D tensor .* got shape \(40,\)"),
    (lambda w: wk.compress_bitmap(w, torch.ones(3, 41, dtype=torch.bool)), ValueError,
     r"mask has shape \(3, 41\) but weight has shape \(3, 40\)"),
    (lambda w: wk.compress_bitmap(w, torch.ones(3, 40)), TypeError, r"mask must be a bool tensor .* got torch\.float32"),
    (lambda w: wk.compress_bitmap(w, [[True]]), TypeError, r"mask must be a bool torch\.Tensor or None; got list"),
    (lambda w: wk.compress_bitmap(w.numpy()), TypeError, r"weight must be a torch\.Tensor; got ndarray"),
])
def test_compress_refusals(call, exc, message):
    w = _weight(3, 40, torch.float16)
    with pytest.raises(exc, match=message):
        call(w)


def test_decompress_refuses_parts_that_do_not_belong_together():
    w = _weight(3, 40, torch.float16)
    values, bits, _ = wk.compress_bitmap(w, _mask(3, 40))
    with pytest.raises(ValueError, match=r"bitmap for in_features=70 must be int32 of shape \(out_features, 3\)"):
        wk.decompress_bitmap(values, bits, 70)
    with pytest.raises(ValueError, match=r"bitmap for in_features=40 must be int32 .* got torch\.int64"):
        wk.decompress_bitmap(values, bits.long(), 40)
    with pytest.raises(ValueError, match=r"bitmap row 0 has 20 set bits but 19 values are stored for it"):
        wk.decompress_bitmap(values[:, 1:].contiguous(), bits, 40)
    stray = bits.clone()
    stray[2, 1] |= 1 << 9  # column 41 of a 40-column weight
    stray[2, 0] &= ~int(stray[2, 0] & -stray[2, 0])  # ... and one bit fewer, so the counts still match
    with pytest.raises(ValueError, match=r"bitmap has bits set past in_features=40"):
        wk.decompress_bitmap(values, stray, 40)
    with pytest.raises(ValueError, match=r"values must be 1-D .* with row_offsets"):
        wk.decompress_bitmap(values, bits, 40, torch.tensor([0, 20, 40, 60]))
    with pytest.raises(ValueError, match=r"row_offsets must start at 0 and end at values\.numel\(\) = 60"):
        wk.decompress_bitmap(values.reshape(-1), bits, 40, torch.tensor([0, 20, 40, 61]))
    with pytest.raises(TypeError, match=r"values must be float16 or bfloat16; got torch\.float32"):
        wk.decompress_bitmap(values.float(), bits, 40)


# ---------------------------------------------------------------------------
# The Triton kernel (the interpreter here; compiled on a GPU)


def _tolerance(x2d, dense_w, dtype, ref):
    """fp16/bf16 products are exact in fp32, so kernel and reference (``ref``, fp32) differ by
    the order of their fp32 sums (at most K * 2^-24 * sum |x w| per output) plus one rounding
    of the output to ``dtype`` (half an ulp: at most 2^-11 or 2^-8 of |y|; 1e-6 for subnormals).
    Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (1 + 2^-8 +
    2^-10 becomes 1.0 there, 1.0078125 compiled): a whole ulp, 2^-7, under it."""
    k = x2d.shape[1]
    sums = x2d.float().abs() @ dense_w.float().abs().t()
    out_eps = 2.0**-11 if dtype == torch.float16 else 2.0**-7 if INTERPRETING else 2.0**-8
    return k * 2.0**-24 * sums + out_eps * ref.abs() + 1e-6


# (out, in, tokens, splits): odd outs (not a multiple of any BLOCK_N), ins not a multiple of
# 32, one and several chunks, each token-count regime (1, 2, 3-4, 5-16 tl.dot, >16 tiles).
KERNEL_CASES = [
    (37, 72, 1, None), (64, 96, 2, None), (33, 100, 3, None), (65, 40, 13, None), (50, 300, 17, None),
    (40, 2050, 1, 3), (70, 1100, 4, 2), (64, 2100, 16, 3), (31, 1030, 2, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out", "in_", "tokens", "splits"), KERNEL_CASES)
@pytest.mark.parametrize("equal", [True, False])
def test_kernel_equals_the_reference(triton_device, out, in_, tokens, splits, dtype, equal):
    w = _weight(out, in_, dtype, seed=out + in_).to(triton_device)
    mask = _mask(out, in_, seed=tokens, density=0.5, equal=equal).to(triton_device)
    values, bits, offsets = wk.compress_bitmap(w, mask)
    chunks = bitmap.chunk_offsets(bits, values, offsets)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_, generator=g).to(dtype).to(triton_device)
    bias = torch.randn(out, generator=g).to(dtype).to(triton_device) if tokens % 2 else None
    y = kernel_linear(x, values, bits, chunks, bias, splits=splits)
    assert y.shape == (tokens, out) and y.dtype == dtype
    ref = reference.bitmap_linear(x.cpu(), values.cpu(), bits.cpu(), None if bias is None else bias.cpu(),
                                  None if offsets is None else offsets.cpu())
    dense = torch.where(mask, w, torch.zeros_like(w)).cpu()
    err = (y.float().cpu() - ref).abs()
    assert bool((err <= _tolerance(x.cpu(), dense, dtype, ref)).all()), float(err.max())


def test_kernel_splits_give_the_unsplit_result_up_to_fp32_order(triton_device):
    # Split-K starts each split from the chunk table: 1, 2 and 3 splits of a 3-chunk row
    # must agree (fp32 partial sums added in a fixed order; one rounding at the end).
    w = _weight(48, 3000, torch.float16, seed=7).to(triton_device)
    values, bits, offsets = wk.compress_bitmap(w, _mask(48, 3000, seed=7).to(triton_device))
    chunks = bitmap.chunk_offsets(bits, values, offsets)
    x = torch.randn(1, 3000, generator=torch.Generator().manual_seed(1)).half().to(triton_device)
    ys = [kernel_linear(x, values, bits, chunks, None, splits=s).float() for s in (1, 2, 3)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=2.0**-10, atol=1e-3)


def test_kernel_reads_strided_and_batched_inputs(triton_device):
    lin = _pruned_linear(96, 40, torch.float16, seed=2).to(triton_device)
    m = wk.BitmapLinear.from_linear(lin, backend="triton")
    big = torch.randn(2, 5, 200, generator=torch.Generator().manual_seed(0)).half().to(triton_device)
    x = big[..., 10:106]  # non-contiguous rows
    y = m(x)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, m(x.contiguous()), rtol=0, atol=0)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    err = (y.float() - ref).abs()
    tol = _tolerance(x.reshape(-1, 96).cpu(), lin.weight.detach().cpu(), torch.float16,
                     ref.reshape(-1, 40).cpu()).reshape(2, 5, 40)
    assert bool((err.cpu() <= tol).all())


# ---------------------------------------------------------------------------
# BitmapLinear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("in_", "out", "bias"), [(100, 37, True), (64, 64, False), (576, 1536, True)])
def test_module_dense_fallback_equals_linear_exactly(in_, out, bias, dtype):
    lin = _pruned_linear(in_, out, dtype, bias=bias)
    m = wk.BitmapLinear.from_linear(lin, backend="torch")
    x = torch.randn(3, 4, in_, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        # The decompressed weight is the pruned weight bit for bit: the same F.linear.
        assert torch.equal(m(x), lin(x))
        assert torch.equal(m.to_dense(), lin.weight) and torch.equal(m.mask(), lin.weight != 0)
    assert m.values.shape == (out, in_ // 2) and m.row_offsets is None


def test_module_triton_path_matches_the_fallback(triton_device):
    lin = _pruned_linear(300, 50, torch.bfloat16, seed=4).to(triton_device)
    m = wk.BitmapLinear.from_linear(lin, backend="triton")
    assert m.kernel() == "triton bitmap"
    for tokens in (1, 5, 20):
        x = torch.randn(tokens, 300, generator=torch.Generator().manual_seed(tokens)).bfloat16().to(triton_device)
        with torch.no_grad():
            ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            y = m(x)
        err = (y.float() - ref).abs()
        tol = _tolerance(x.cpu(), lin.weight.detach().cpu(), torch.bfloat16, ref.cpu())
        assert bool((err.cpu() <= tol).all()), float(err.max())


def test_auto_warns_once_on_cpu_and_names_why():
    _warn.forget()
    m = wk.BitmapLinear.from_linear(_pruned_linear(64, 32, torch.float16))
    x = torch.randn(2, 64).half()
    with pytest.warns(RuntimeWarning, match=r"BitmapLinear runs dense F\.linear on the decompressed weight: the "
                                            r"bitmap kernels run on CUDA GPUs and the layer is on cpu") as record:
        m(x)
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)  # said once
    assert "dense fallback (the bitmap kernels run on CUDA GPUs" in repr(m)


def test_state_dict_round_trip_takes_the_sizes_it_is_given():
    # Unequal rows (a mask from elsewhere): 1-D values and row offsets; a fresh module of
    # the same shape loads them, and the chunk table is rebuilt.
    w = _weight(20, 2100, torch.float16, seed=5)
    mask = _mask(20, 2100, seed=5, density=0.3, equal=False)
    src = wk.BitmapLinear.from_dense(w, torch.randn(20).half(), mask)
    state = src.state_dict()
    assert set(state) == {"values", "bitmap", "row_offsets", "bias"}  # the chunk table is derived, not saved
    dst = wk.BitmapLinear(2100, 20)
    assert dst.values.shape == (20, 0) and dst.row_offsets is None
    dst.load_state_dict(state)
    assert torch.equal(dst.to_dense(), src.to_dense()) and torch.equal(dst.chunks, src.chunks)
    assert dst.row_offsets is not None and dst.values.shape == (int(mask.sum()),)
    # ... and back to equal rows: the offsets go.
    equal = wk.BitmapLinear.from_dense(w, None, _mask(20, 2100, seed=6)).state_dict()
    dst2 = wk.BitmapLinear(2100, 20, bias=False)
    dst2.load_state_dict(equal)
    assert dst2.row_offsets is None and dst2.values.shape == (20, 1050)


def test_a_refused_load_leaves_the_module_unchanged():
    m = wk.BitmapLinear.from_linear(_pruned_linear(64, 16, torch.float16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    chunks = m.chunks.clone()
    bad = {k: v.clone() for k, v in before.items()}
    bad["values"] = bad["values"][:, 1:].contiguous()  # one value fewer per row than the bits say
    bad["bias"] += 1
    with pytest.raises(ValueError, match=r"BitmapLinear \(root\): bitmap row 0 has 32 set bits but 31 values"):
        m.load_state_dict(bad)
    wrong_shape = {**before, "bitmap": before["bitmap"][:8]}
    with pytest.raises(RuntimeError, match=r"size mismatch for bitmap"):
        m.load_state_dict(wrong_shape)
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(m.chunks, chunks)


def test_moves_and_dtype_conversions():
    lin = _pruned_linear(64, 16, torch.float16)
    m = wk.BitmapLinear.from_linear(lin).to(torch.bfloat16)
    assert m.values.dtype == torch.bfloat16 and m.bitmap.dtype == torch.int32 and m.chunks.dtype == torch.int32
    x = torch.randn(3, 64)
    with torch.no_grad():
        # .float(): values in fp32, forward dense in fp32 on the same (rounded) weights.
        m32 = wk.BitmapLinear.from_linear(lin, backend="torch").float()
        assert torch.equal(m32(x), F.linear(x, lin.weight.float(), lin.bias.float()))


def test_torch_compile_traces_the_op():
    lin = _pruned_linear(64, 32, torch.float16)
    m = wk.BitmapLinear.from_linear(lin, backend="torch")
    x = torch.randn(5, 64).half()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # runs the fake impl while tracing
    with torch.no_grad():
        assert torch.equal(compiled(x), m(x))


@pytest.mark.parametrize(("change", "exc", "message"), [
    (dict(x=torch.randn(2, 64)), TypeError, r"x is torch\.float32 but values is torch\.float16"),
    (dict(chunks=torch.zeros(32, 2, dtype=torch.int32)), ValueError,
     r"chunks \(the chunk offset table\) must be int32 of shape \(32, 1\)"),
    (dict(bias=torch.zeros(31).half()), ValueError, r"bias must be None or a tensor of shape \(32,\)"),
    (dict(bias=torch.zeros(32)), TypeError, r"bias is torch\.float32 but x is torch\.float16"),
    (dict(bitmap=torch.zeros(32, 3, dtype=torch.int32)), ValueError, r"bitmap for in_features=64 must be int32"),
    (dict(values=torch.zeros(32, 2, 2).half()), ValueError, r"values must be a 1-D or 2-D tensor"),
    (dict(x=torch.randn(2, 0).half()), ValueError, r"x must be \(\.\.\., in_features\) with in_features >= 1"),
])
def test_the_op_checks_every_operand_and_names_it(change, exc, message):
    m = wk.BitmapLinear.from_linear(_pruned_linear(64, 32, torch.float16))
    ops = dict(x=torch.randn(2, 64).half(), values=m.values, bitmap=m.bitmap, chunks=m.chunks, bias=m.bias)
    ops.update(change)
    with pytest.raises(exc, match=message):
        check_operands(**ops)
    with pytest.raises(exc, match=message):
        torch.ops.wanda_kernels.bitmap_linear(*ops.values(), "torch")


def test_module_refusals():
    m = wk.BitmapLinear.from_linear(_pruned_linear(64, 32, torch.float16))
    with pytest.raises(ValueError, match=r"BitmapLinear expects input \(\.\.\., 64\); got \(2, 63\)"):
        m(torch.randn(2, 63).half())
    with pytest.raises(TypeError, match=r"BitmapLinear holds torch\.float16 weights; got input of torch\.float32"):
        m(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'triton', 'torch'; got 'cuda'"):
        m.backend = "cuda"
    with pytest.raises(TypeError, match=r"BitmapLinear stores float16 or bfloat16 weights; got dtype=torch\.float32"):
        wk.BitmapLinear(64, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"in_features must be a positive int; got 0"):
        wk.BitmapLinear(0, 32)
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear \(or transformers' Conv1D\); got Conv1d"):
        wk.BitmapLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(32,\)"):
        wk.BitmapLinear.from_dense(torch.zeros(32, 64).half(), torch.zeros(3).half())


# ---------------------------------------------------------------------------
# sparsify_(format="bitmap")


def _mlp(dtype=torch.float16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 32)).to(dtype)
    wk.prune_(model[0], torch.rand(64) + 0.1, 0.5)
    wk.prune_(model[2], torch.rand(96) + 0.1, 0.3)
    return model  # model[4] is dense


def test_sparsify_bitmap_replaces_the_pruned_layers_only():
    model = _mlp()
    x = torch.randn(4, 64).half()
    with torch.no_grad():
        expected = model(x)
    assert wk.sparsify_(model, format="bitmap", min_sparsity=0.25) == ["0", "2"]
    assert isinstance(model[0], wk.BitmapLinear) and isinstance(model[2], wk.BitmapLinear)
    assert type(model[4]) is torch.nn.Linear
    model[0].backend = model[2].backend = "torch"
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert wk.sparsify_(_mlp(), format="bitmap", min_sparsity=0.4) == ["0"]


def test_sparsify_bitmap_refusals_change_nothing():
    model = _mlp().float()
    with pytest.raises(TypeError, match=r"0 is at least 0\.25 sparse but torch\.float32; BitmapLinear stores"):
        wk.sparsify_(model, format="bitmap")
    assert all(type(m) is torch.nn.Linear for m in (model[0], model[2], model[4]))
    with pytest.raises(ValueError, match=r"format must be one of '2:4', 'bitmap'; got 'csr'"):
        wk.sparsify_(model, format="csr")
    with pytest.raises(ValueError, match=r"min_sparsity must be a number in \(0, 1\]; got 0"):
        wk.sparsify_(model, format="bitmap", min_sparsity=0)
    with pytest.raises(ValueError, match=r"BitmapLinear\.from_linear"):
        wk.sparsify_(model[0], format="bitmap")
