"""DSnoT refinement: never raises a row's reconstruction error, keeps every count, and finds the hand-computed swap."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wanda_kernels as wk

transformers = pytest.importorskip("transformers")

from test_pipeline import calib_ids, tiny_model  # noqa: E402

from wanda_kernels.llm import pipeline  # noqa: E402
from wanda_kernels.llm.dsnot import dsnot_refine, reconstruction_error  # noqa: E402


def _toy_layer(rows=24, cols=48, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # Correlated features with unequal scales: Wanda's per-feature score ignores the correlations.
    mix = torch.randn(cols, cols, generator=g) * 0.5 + torch.eye(cols) * 2
    x = torch.randn(tokens, cols, generator=g) @ mix * (torch.rand(cols, generator=g) + 0.2)
    return w, x, x.double().t() @ x.double()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_never_increases_error_and_keeps_counts(pattern):
    w, x, gram = _toy_layer()
    norms = x.norm(dim=0)
    keep = wk.prune_mask(w, norms, 0.5 if pattern == "unstructured" else None, pattern=pattern)
    refined = dsnot_refine(w, keep, gram, nm=None if pattern == "unstructured" else (int(pattern[0]), int(pattern[2])))
    before, after = reconstruction_error(w, keep, gram), reconstruction_error(w, refined, gram)
    assert (after <= before * (1 + 1e-6)).all()  # no row gets worse (fp64 evaluation of fp32 choices)
    assert after.sum() < 0.95 * before.sum()  # and the layer is clearly better on this correlated toy
    assert torch.equal(refined.sum(dim=1), keep.sum(dim=1))
    if pattern != "unstructured":
        m = int(pattern[2])
        assert torch.equal(refined.reshape(24, -1, m).sum(-1), keep.reshape(24, -1, m).sum(-1))
    # The error it lowers is the real one: ||(W - W') X^T||^2 on the tokens.
    direct = ((w * ~refined).double() @ x.double().t()).pow(2).sum(dim=1)
    torch.testing.assert_close(after, direct, rtol=1e-9, atol=0)


def test_hand_computed_swap():
    # x2 = -x1, so pruning both w1 and w2 (equal) removes nothing from the output:
    # G = [[1, 0, 0], [0, 1, -1], [0, -1, 1]], w = [0.5, 0.9, 0.9], keep 1 of 3.
    # Wanda (all norms 1) prunes 0.5 and the first 0.9: error 0.25 + 0.81 = 1.06.
    # Best: keep w0, prune w1 and w2: error 0.
    w = torch.tensor([[0.5, 0.9, 0.9]])
    gram = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
    keep = wk.prune_mask(w, torch.ones(3), 0.67)  # floor(0.67 * 3) = 2 pruned
    assert keep.tolist() == [[False, False, True]]
    assert reconstruction_error(w, keep, gram).item() == pytest.approx(1.06)
    refined = dsnot_refine(w, keep, gram)
    assert refined.tolist() == [[True, False, False]]
    assert reconstruction_error(w, refined, gram).item() == pytest.approx(0.0, abs=1e-12)


def test_optimal_mask_is_left_alone():
    # Orthogonal features of equal norm: the error is the sum of the pruned w^2, which
    # Wanda's mask already minimises; no swap can lower it.
    w, _, _ = _toy_layer(rows=8, cols=16)
    keep = wk.prune_mask(w, torch.ones(16), 0.5)
    assert torch.equal(dsnot_refine(w, keep, torch.eye(16)), keep)


def test_input_mask_untouched():
    w, _, gram = _toy_layer(rows=4, cols=8)
    keep = wk.prune_mask(w, torch.ones(8), 0.5)
    copy = keep.clone()
    dsnot_refine(w, keep, gram)
    assert torch.equal(keep, copy)


def test_prune_model_dsnot_lowers_layer_error():
    calib = calib_ids()
    plain, refined = tiny_model("llama"), tiny_model("llama")
    pipeline.prune_model(plain, calib, pattern="2:4", progress=False)
    report = pipeline.prune_model(refined, calib, pattern="2:4", dsnot=True, progress=False)
    assert report.options["dsnot"] and report.overall_sparsity() == 0.5
    w_plain = pipeline.find_decoder_layers(plain)[1][0].mlp.down_proj.weight
    w_ref = pipeline.find_decoder_layers(refined)[1][0].mlp.down_proj.weight
    assert not torch.equal(w_plain == 0, w_ref == 0)  # the masks moved
    assert ((w_ref != 0).reshape(w_ref.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_dsnot_needs_wanda(method):
    with pytest.raises(ValueError, match="dsnot=True refines a Wanda"):
        pipeline.check_options(method, 0.5, "unstructured", dsnot=True)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 8), pattern=st.sampled_from(["unstructured", "2:4", "4:8"]),
       sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_never_worse_same_counts(rows, groups, pattern, sparsity, seed):
    m = 8 if pattern == "4:8" else 4
    cols = groups * m
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(3 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    gram = x.double().t() @ x.double()
    nm = None if pattern == "unstructured" else ((2 if m == 4 else 4), m)
    keep = wk.prune_mask(w, x.norm(dim=0), sparsity if nm is None else None, pattern=pattern)
    refined = dsnot_refine(w, keep, gram, nm=nm)
    before, after = reconstruction_error(w, keep, gram), reconstruction_error(w, refined, gram)
    assert (after <= before * (1 + 1e-6) + 1e-9).all()
    per = cols if nm is None else m  # unstructured: per row; N:M: per group
    assert torch.equal(refined.reshape(rows, -1, per).sum(-1), keep.reshape(rows, -1, per).sum(-1))
