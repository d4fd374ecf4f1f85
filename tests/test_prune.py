"""prune_ / prune_mask: Triton == torch == reference, on random, tied, odd and strided inputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wanda_kernels as wk
from wanda_kernels import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(rows, cols, dtype, seed, *, ties=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct magnitudes and norms: most scores tie with many others.
        w = torch.randint(-3, 4, (rows, cols), generator=g).to(dtype)
        norms = torch.randint(0, 3, (cols,), generator=g).float()
    else:
        w = torch.randn(rows, cols, generator=g).to(dtype)
        norms = torch.rand(cols, generator=g) * 4
    return w.to(device), norms.to(device)


def _check_against_reference(w, norms, keep, **kw):
    ref_keep = reference.keep_mask(w.cpu(), norms.cpu(), **kw)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert torch.equal(keep.cpu(), ref_keep)
    return ref_keep


# Triton runs interpreted on CPU here: shapes stay small (64x256 and odd sizes).
TRITON_CASES = [
    (64, 256, dict(sparsity=0.5)),
    (33, 100, dict(sparsity=0.5)),  # odd rows, padded block (128)
    (16, 96, dict(sparsity=0.3)),
    (64, 256, dict(pattern="2:4")),
    (64, 256, dict(pattern="4:8")),
    (30, 96, dict(pattern="1:3")),  # M not a power of two (padded to 4)
    (9, 120, dict(pattern="5:12")),
    (8, 64, dict(pattern="16:32")),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "kw"), TRITON_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_triton_equals_torch_equals_reference(rows, cols, kw, dtype, ties, triton_device):
    w, norms = _inputs(rows, cols, dtype, seed=rows * cols, ties=ties)
    keep_torch = wk.prune_mask(w, norms, backend="torch", **kw)
    ref_keep = _check_against_reference(w, norms, keep_torch, **kw)

    wt = w.to(triton_device)
    keep_triton = wk.prune_(wt, norms.to(triton_device), backend="triton", return_mask=True, **kw)
    assert torch.equal(keep_triton.cpu(), ref_keep)
    assert torch.equal(wt.cpu(), w.masked_fill(~ref_keep, 0))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_triton_magnitude_and_mask_only(kw, triton_device):
    w, _ = _inputs(32, 128, torch.float16, seed=3)
    w = w.to(triton_device)
    before = w.clone()
    keep = wk.prune_mask(w, None, metric="magnitude", backend="triton", **kw)
    assert torch.equal(w, before)  # prune_mask never writes the weight
    assert torch.equal(keep.cpu(), reference.keep_mask(w.cpu(), None, metric="magnitude", **kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_strided_weight(backend, kw, request):
    dev = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    base, norms = _inputs(64, 24, torch.bfloat16, seed=11)  # (in, out): its .t() is (out, in) with strides (1, 24)
    w = base.to(dev).t()
    assert not w.is_contiguous()
    expected_w, expected_keep = reference.prune(w.cpu(), _norms(norms, 64), **kw)
    keep = wk.prune_(w, _norms(norms, 64).to(dev), backend=backend, return_mask=True, **kw)
    assert torch.equal(keep.cpu(), expected_keep)
    assert torch.equal(w.cpu(), expected_w)


def _norms(norms, n):
    return torch.linspace(0.1, 2.0, n) if norms.numel() != n else norms


def test_nn_linear_is_pruned_in_place():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=True)
    bias = lin.bias.detach().clone()
    norms = torch.rand(64)
    expected, _ = reference.prune(lin.weight.detach(), norms, 0.5)
    out = wk.prune_(lin, norms, 0.5)
    assert out is None
    assert torch.equal(lin.weight.detach(), expected)
    assert torch.equal(lin.bias.detach(), bias)
    assert lin.weight.requires_grad  # still a trainable parameter
    assert (lin.weight == 0).sum(1).eq(32).all()


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4")])
def test_gpt2_conv1d_is_pruned_through_its_out_in_view(kw):
    # transformers' Conv1D stores its weight (in, out) and computes x @ W + b: its rows
    # (the comparison groups) are the columns of the stored weight.
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    conv = Conv1D(16, 64)  # 64 inputs -> 16 outputs, weight (64, 16)
    norms = torch.rand(64)
    expected_w, expected_keep = reference.prune(conv.weight.detach().t(), norms, **kw)
    assert torch.equal(wk.prune_mask(conv, norms, **kw), expected_keep)
    keep = wk.prune_(conv, norms, return_mask=True, **kw)
    assert keep.shape == (16, 64) and torch.equal(keep, expected_keep)
    assert torch.equal(conv.weight.detach(), expected_w.t()) and conv.weight.shape == (64, 16)
    assert conv.weight.requires_grad


def test_scope_layer_prunes_one_global_fraction():
    w, norms = _inputs(40, 64, torch.float32, seed=5)
    keep = wk.prune_mask(w, norms, 0.6, scope="layer")
    assert int((~keep).sum()) == reference.num_pruned(w.numel(), 0.6)
    assert torch.equal(keep, reference.keep_mask(w, norms, 0.6, scope="layer"))
    assert len(set((~keep).sum(1).tolist())) > 1  # rows differ, unlike per-row pruning


def test_llama_shaped_layer_torch_path():
    # A LLaMA-7B q_proj row length with a slice of its rows: exact per-row count.
    w, norms = _inputs(64, 4096, torch.bfloat16, seed=7)
    keep = wk.prune_mask(w, norms, 0.5, backend="torch")
    _check_against_reference(w, norms, keep, sparsity=0.5)
    assert keep.sum(1).eq(2048).all()


# ---------------------------------------------------------------------------
# Properties (hypothesis), torch path against the reference.

@st.composite
def problems(draw):
    nm = draw(st.one_of(st.none(), st.tuples(st.integers(1, 31), st.integers(2, 32)).filter(lambda t: t[0] < t[1])))
    rows = draw(st.integers(1, 12))
    if nm is None:
        cols = draw(st.integers(1, 300))
        sparsity = draw(st.floats(0.0, 0.99, allow_nan=False))
        kw = dict(sparsity=sparsity)
    else:
        cols = nm[1] * draw(st.integers(1, 8))
        kw = dict(pattern=f"{nm[0]}:{nm[1]}")
    dtype = draw(st.sampled_from(DTYPES))
    metric = draw(st.sampled_from(["wanda", "magnitude"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, cols, dtype, dict(kw, metric=metric), seed


def _group_view(t, kw):
    """Rows, or N:M groups, as the last dim: the comparison groups of the pattern."""
    if "pattern" in kw:
        m = int(kw["pattern"].split(":")[1])
        return t.reshape(-1, m)
    return t


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_torch_path_equals_reference_tie_free(problem):
    rows, cols, dtype, kw, seed = problem
    g = torch.Generator().manual_seed(seed)
    # Tie-free scores: distinct magnitudes per row, norms = 1 (so the score is |w|).
    w = (torch.rand(rows, cols, generator=g).argsort(dim=1).to(torch.float32) + 1).to(dtype)
    w = w * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1, 1).to(dtype)
    norms = torch.ones(cols)
    if dtype == torch.bfloat16 and cols > 256:
        w = w.float()  # bf16 has 8 significant bits: integers above 256 would collide
    keep = wk.prune_mask(w, norms, backend="torch", **kw)
    assert torch.equal(keep, reference.keep_mask(w, norms, **kw))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_torch_path_invariants_with_ties(problem):
    rows, cols, dtype, kw, seed = problem
    w, norms = _inputs(rows, cols, dtype, seed, ties=True)
    keep = wk.prune_mask(w, norms, backend="torch", **kw)
    ref_keep = reference.keep_mask(w, norms, **kw)
    score = (reference.magnitude_score(w) if kw["metric"] == "magnitude" else reference.wanda_score(w, norms))
    # Exact count per row / group ...
    assert torch.equal(_group_view(keep, kw).sum(-1), _group_view(ref_keep, kw).sum(-1))
    if "pattern" in kw:
        n = int(kw["pattern"].split(":")[0])
        assert _group_view(keep, kw).sum(-1).eq(n).all()
    else:
        assert (~keep).sum(1).eq(reference.num_pruned(cols, kw["sparsity"])).all()
    # ... the same kept-score sum (any valid tie-break keeps equal scores) ...
    kept = _group_view(score * keep, kw).double().sum(-1)
    ref_kept = _group_view(score * ref_keep, kw).double().sum(-1)
    assert torch.equal(kept, ref_kept)
    # ... and our documented tie rule makes the masks identical too.
    assert torch.equal(keep, ref_keep)
