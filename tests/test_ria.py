"""metric="ria": RIA's relative importance, torch path == Triton kernel == the paper's formula."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wanda_kernels as wk
from wanda_kernels import _torch_impl, reference
from wanda_kernels._validation import num_pruned
from wanda_kernels.prune import RIA_POWER


def test_hand_computed_mask_differs_from_wanda():
    # Row sums 3 and 21, column sums 22 and 2, norms 1 (so ||X||^0.5 = 1):
    #   S00 = 2/3 + 2/22 = 0.758   S01 = 1/3 + 1/2 = 0.833   -> row 0 prunes column 0,
    #   S10 = 20/21 + 20/22 = 1.861  S11 = 1/21 + 1/2 = 0.548 -> row 1 prunes column 1;
    # Wanda (|W| * 1) prunes column 1 in both rows: RIA keeps the weight that is large for its column.
    w = torch.tensor([[2.0, 1.0], [20.0, 1.0]])
    norms = torch.ones(2)
    expected = torch.tensor([[False, True], [True, False]])
    assert torch.equal(wk.prune_mask(w, norms, 0.5, metric="ria", backend="torch"), expected)
    assert torch.equal(reference.keep_mask(w, norms, 0.5, metric="ria"), expected)
    assert torch.equal(wk.prune_mask(w, norms, 0.5), torch.tensor([[True, False], [True, False]]))
    score = reference.ria_score(w, norms)
    assert score[0, 0].item() == pytest.approx(2 / 3 + 2 / 22) and score[1, 1].item() == pytest.approx(1 / 21 + 1 / 2)


def test_norm_power_is_half():
    # Column 0's norm 16 -> factor 4; a single row: row share 1/2 each, column share 1.
    w = torch.tensor([[1.0, 1.0]])
    score = reference.ria_score(w, torch.tensor([16.0, 1.0]))
    assert RIA_POWER == 0.5
    assert score.tolist() == [[(0.5 + 1.0) * 4.0, (0.5 + 1.0) * 1.0]]


@pytest.mark.parametrize(("rows", "cols"), [(7, 33), (64, 256), (128, 96)])
def test_product_score_matches_formula(rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=g)
    w[0, 3] = 0.0  # a zero weight scores zero
    norms = torch.rand(cols, generator=g) * 5
    row_inv, col_inv = _torch_impl.relative_terms(w)
    score = _torch_impl.score_keys(w, norms ** RIA_POWER, (row_inv, col_inv)).view(torch.float32)
    # fp32 sums of n non-negative terms are within (n - 1) * 2^-24 relative; the inverse,
    # the add, the two products and the power add at most 5 more half-ulps.
    rtol = (max(rows, cols) + 5) * 2.0**-24
    torch.testing.assert_close(score.double(), reference.ria_score(w, norms), rtol=rtol, atol=0)
    assert score[0, 3] == 0


def test_zero_row_and_column():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, -2.0, 3.0]])
    row_inv, col_inv = _torch_impl.relative_terms(w)
    assert row_inv[0] == 0 and col_inv[1] == 0  # no inf, no NaN
    keep = wk.prune_mask(w, torch.ones(4), 0.5, metric="ria")
    assert keep.sum(dim=1).tolist() == [2, 2]


CASES = [
    (64, 256, dict(sparsity=0.5)),
    (33, 100, dict(sparsity=0.7)),
    (64, 256, dict(pattern="2:4")),
    (30, 96, dict(pattern="4:8")),
    (9, 120, dict(pattern="5:12")),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols", "kw"), CASES)
def test_triton_equals_torch_equals_reference(rows, cols, kw, dtype, triton_device):
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    norms = torch.rand(cols, generator=g) * 4
    keep_torch = wk.prune_mask(w, norms, metric="ria", backend="torch", **kw)
    # Tie-free inputs: the fp64 formula ranks like the fp32 product.
    assert torch.equal(keep_torch, reference.keep_mask(w, norms, metric="ria", **kw))
    wt = w.to(triton_device)
    keep_triton = wk.prune_(wt, norms.to(triton_device), metric="ria", backend="triton", return_mask=True, **kw)
    assert torch.equal(keep_triton.cpu(), keep_torch)
    assert torch.equal(wt.cpu(), w.masked_fill(~keep_torch, 0))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_ties_triton_equals_torch_and_counts(kw, triton_device):
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-2, 3, (40, 64), generator=g).float()  # many equal scores
    norms = torch.randint(0, 3, (64,), generator=g).float()
    keep = wk.prune_mask(w, norms, metric="ria", backend="torch", **kw)
    keep_triton = wk.prune_mask(w.to(triton_device), norms.to(triton_device), metric="ria", backend="triton", **kw)
    assert torch.equal(keep_triton.cpu(), keep)  # same fp32 products, same tie rule
    if "pattern" in kw:
        assert (keep.reshape(40, 16, 4).sum(-1) == 2).all()
    else:
        assert (keep.sum(dim=1) == 32).all()


def test_bad_arguments():
    w, norms = torch.randn(4, 8), torch.rand(8)
    with pytest.raises(ValueError, match="metric must be one of"):
        wk.prune_mask(w, norms, metric="RIA")
    with pytest.raises(ValueError, match="metric='ria' needs"):
        wk.prune_mask(w, None, metric="ria")
    with pytest.raises(ValueError, match="metric must be one of 'wanda', 'magnitude'"):
        wk.prune_compress_24(torch.randn(32, 64, dtype=torch.float16), torch.rand(64), metric="ria")
    before = w.clone()
    with pytest.raises(ValueError, match="norms must be finite"):
        wk.prune_(w, torch.full((8,), -1.0), metric="ria")
    assert torch.equal(w, before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 12), groups=st.integers(1, 16), pattern=st.sampled_from(["unstructured", "2:4", "4:8"]),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_hypothesis_counts_and_order(rows, groups, pattern, sparsity, seed, ties):
    # Whatever the shape and the ties: exact counts, and inside each comparison group no
    # pruned weight scores above a kept one (by the fp32 RIA scores prune_ ranks).
    m = 8 if pattern == "4:8" else 4
    cols = groups * m
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (rows, cols), generator=g).float() if ties else torch.randn(rows, cols, generator=g)
    norms = torch.randint(0, 3, (cols,), generator=g).float() if ties else torch.rand(cols, generator=g) * 3
    kw = dict(sparsity=sparsity) if pattern == "unstructured" else dict(pattern=pattern)
    keep = wk.prune_mask(w, norms, metric="ria", **kw)
    score = _torch_impl.score_keys(w, norms ** RIA_POWER, _torch_impl.relative_terms(w)).view(torch.float32)
    if pattern == "unstructured":
        assert (keep.sum(dim=1) == cols - num_pruned(cols, sparsity)).all()
        blocks = [(keep, score)]
    else:
        n = 2 if pattern == "2:4" else 4
        assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
        blocks = [(keep[:, j : j + m], score[:, j : j + m]) for j in range(0, cols, m)]
    for k, s in blocks:
        lowest_kept = torch.where(k, s, torch.inf).min(dim=1).values
        highest_pruned = torch.where(~k, s, -torch.inf).max(dim=1).values
        assert (highest_pruned <= lowest_kept).all()
