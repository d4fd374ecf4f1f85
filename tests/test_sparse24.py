"""The 2:4 compressed format, bit for bit against PyTorch's own CUTLASS packer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_pack,
)
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_to_dense_cutlass as torch_unpack,
)

import wanda_kernels as wk
from wanda_kernels import reference

DTYPES = [torch.float16, torch.bfloat16]


def _bits(t):
    return t.contiguous().view(torch.int16)


def random_24(m, k, dtype, seed, *, zero_frac=0.15, neg_zero=True):
    """A random 2:4 weight, with extra zeros (groups with < 2 non-zeros) and -0.0s."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).to(dtype)
    keep = reference.nm_mask(torch.rand(m, k, generator=g), 2, 4)
    w = w.masked_fill(~keep, 0)
    extra = torch.rand(m, k, generator=g) < zero_frac
    w = w.masked_fill(extra, -0.0 if neg_zero else 0.0)
    return w


SHAPES = [(32, 64), (64, 128), (96, 320), (128, 4096), (32, 11008)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), SHAPES)
def test_compress_matches_pytorch_packer_bit_for_bit(m, k, dtype):
    w = random_24(m, k, dtype, seed=m + k)
    values, meta = wk.compress_24(w)
    t_values, t_meta = torch_pack(w)
    assert values.shape == (m, k // 2) and meta.shape == (m, k // 16) and meta.dtype == torch.int16
    assert torch.equal(_bits(values), _bits(t_values))
    assert torch.equal(meta, t_meta)
    # The reference twin agrees as well.
    r_values, r_meta = reference.compress_24(w)
    assert torch.equal(_bits(r_values), _bits(values)) and torch.equal(r_meta, meta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), SHAPES)
def test_decompress_inverts_both_packers(m, k, dtype):
    w = random_24(m, k, dtype, seed=7 * m + k)
    values, meta = wk.compress_24(w)
    # Value equality: a kept -0.0 in a slot the fill rule does not store comes back as
    # +0.0, in PyTorch's format as in ours.
    assert torch.equal(wk.decompress_24(values, meta), w)
    assert torch.equal(wk.decompress_24(values, meta), torch_unpack(values, meta))
    assert torch.equal(reference.decompress_24(values, meta), w)
    t_values, t_meta = torch_pack(w)
    assert torch.equal(wk.decompress_24(t_values, t_meta), w)


@settings(max_examples=60, deadline=None)
@given(
    mb=st.integers(1, 4), kb=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
    zero_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
)
def test_property_compress_equals_pytorch(mb, kb, dtype, zero_frac, seed):
    w = random_24(32 * mb, 64 * kb, dtype, seed, zero_frac=zero_frac)
    values, meta = wk.compress_24(w)
    t_values, t_meta = torch_pack(w)
    assert torch.equal(_bits(values), _bits(t_values)) and torch.equal(meta, t_meta)
    assert torch.equal(wk.decompress_24(values, meta), w)


# Every non-zero pattern of a group (bit j = position j non-zero) and the stored pair.
PAIRS = {
    0b0011: (0, 1), 0b0101: (0, 2), 0b1001: (0, 3), 0b0110: (1, 2), 0b1010: (1, 3), 0b1100: (2, 3),
    0b0001: (0, 2), 0b0010: (1, 2), 0b0100: (2, 3), 0b1000: (2, 3), 0b0000: (2, 3),
}


@pytest.mark.parametrize("pattern", list(PAIRS))
def test_pair_rule_by_hand(pattern):
    flags = tuple(bool(pattern >> j & 1) for j in range(4))
    assert reference.pair_24(flags) == PAIRS[pattern]
    # The public packer stores the same pair: one row of groups with this pattern.
    w = torch.zeros(32, 64, dtype=torch.float16)
    for j in range(4):
        if flags[j]:
            w[:, j::4] = float(j + 1)
    values, _ = wk.compress_24(w)
    expected = [float(j + 1) if flags[j] else 0.0 for j in PAIRS[pattern]]
    assert values[0, :2].tolist() == expected


def test_meta_nibbles_by_hand():
    # Row 0, groups 0..3 store (0,1), (2,3), (0,3), (1,2): codes 0x4, 0xE, 0xC, 0x9 -> 0x9CE4.
    w = torch.zeros(32, 64, dtype=torch.float16)
    w[0, [0, 1, 6, 7, 8, 11, 13, 14]] = 1.0
    w[1:, :] = reference.prune(torch.randn(31, 64).half(), None, pattern="2:4", metric="magnitude")[0]
    _, meta = wk.compress_24(w)
    # Plain element (0, 0) is stored at offset 0 (row 0 stays, column 0 is not swizzled).
    assert int(meta.reshape(-1)[0]) & 0xFFFF == 0x9CE4


@pytest.mark.parametrize(
    ("weight", "exc", "message"),
    [
        (torch.ones(32, 64, dtype=torch.float16), ValueError, r"not 2:4 sparse: row 0, group 0 \(columns 0\.\.3\) has 4 non-zeros"),
        (torch.zeros(32, 64, dtype=torch.float32), TypeError, r"float16 or bfloat16 .* got torch\.float32"),
        (torch.zeros(48, 64, dtype=torch.float16), ValueError, r"out_features % 32 == 0 and in_features % 64 == 0"),
        (torch.zeros(32, 96, dtype=torch.float16), ValueError, r"shape \(32, 96\)"),
        (torch.zeros(64, dtype=torch.float16), ValueError, r"must be 2-D"),
    ],
)
def test_compress_refusals(weight, exc, message):
    with pytest.raises(exc, match=message):
        wk.compress_24(weight)


def test_compress_names_first_offending_group():
    w = random_24(64, 128, torch.float16, seed=1)
    w[37, 4 * 9 : 4 * 9 + 4] = 1.0
    w[50, :4] = 1.0
    with pytest.raises(ValueError, match=r"row 37, group 9 \(columns 36\.\.39\) has 4 non-zeros"):
        wk.compress_24(w)


def test_decompress_refusals():
    values, meta = wk.compress_24(torch.zeros(32, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"meta \(sm80\) must be int16 of shape \(32, 4\)"):
        wk.decompress_24(values, meta[:, :2])
    with pytest.raises(ValueError, match=r"meta \(sm80\) must be int16"):
        wk.decompress_24(values, meta.int())
    with pytest.raises(ValueError, match=r"values must be 2-D float16/bfloat16"):
        wk.decompress_24(values.float(), meta)


# ---------------------------------------------------------------------------
# Fused prune + compress == prune_ then compress_24.

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["wanda", "magnitude"])
@pytest.mark.parametrize(("m", "k"), [(64, 256), (32, 64), (96, 128)])
def test_prune_compress_equals_prune_then_compress(m, k, dtype, metric, backend, request):
    dev = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(m * k)
    w = torch.randn(m, k, generator=g).to(dtype)
    w[torch.rand(m, k, generator=g) < 0.2] = -0.0  # zeros the selection may keep
    w[torch.rand(m, k, generator=g) < 0.1] = 0.0
    norms = torch.randint(0, 3, (k,), generator=g).float()  # ties in the scores
    expected_w = w.clone()
    wk.prune_(expected_w, norms if metric == "wanda" else None, pattern="2:4", metric=metric)
    e_values, e_meta = wk.compress_24(expected_w)

    wd = w.to(dev)
    before = wd.clone()
    values, meta = wk.prune_compress_24(wd, norms.to(dev) if metric == "wanda" else None, metric=metric,
                                        backend=backend)
    assert torch.equal(_bits(values.cpu()), _bits(e_values))
    assert torch.equal(meta.cpu(), e_meta)
    assert torch.equal(_bits(wd), _bits(before))  # the weight is not touched


def test_prune_compress_strided_weight(triton_device):
    base = torch.randn(128, 64, generator=torch.Generator().manual_seed(3)).half()
    w = base.t()  # (64, 128) with strides (1, 64)
    norms = torch.rand(128)
    e_values, e_meta = wk.compress_24(reference.prune(w, norms, pattern="2:4")[0])
    values, meta = wk.prune_compress_24(w.to(triton_device), norms.to(triton_device), backend="triton")
    assert torch.equal(_bits(values.cpu()), _bits(e_values)) and torch.equal(meta.cpu(), e_meta)


def test_prune_compress_refusals():
    w = torch.randn(32, 64).half()
    with pytest.raises(ValueError, match=r"norms is None, but metric='wanda'"):
        wk.prune_compress_24(w, None)
    with pytest.raises(ValueError, match=r"norms must have shape"):
        wk.prune_compress_24(w, torch.ones(63))
    with pytest.raises(TypeError, match=r"float16 or bfloat16"):
        wk.prune_compress_24(w.float(), torch.ones(64))
    with pytest.raises(ValueError, match=r"metric must be one of"):
        wk.prune_compress_24(w, torch.ones(64), metric="sparsegpt")
