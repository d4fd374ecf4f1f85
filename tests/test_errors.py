"""Every bad input raises TypeError/ValueError naming the argument, and changes nothing."""

import re

import pytest
import torch
from torch import nn

import wanda_kernels as wk


def _same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _weight():
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


GOOD_NORMS = torch.rand(8, generator=torch.Generator().manual_seed(1))

# (kwargs given to prune_ on top of a good weight and norms, exception, text in message)
BAD_CALLS = {
    "sparsity=1.0": (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\); got 1\.0"),
    "sparsity=-0.1": (dict(sparsity=-0.1), ValueError, r"sparsity .* got -0\.1"),
    "sparsity=nan": (dict(sparsity=float("nan")), ValueError, r"sparsity .* got nan"),
    "sparsity=1.2": (dict(sparsity=1.2), ValueError, r"got 1\.2"),
    "sparsity=str": (dict(sparsity="0.5"), TypeError, r"sparsity must be a real number.*'0\.5'"),
    "sparsity=True": (dict(sparsity=True), TypeError, r"sparsity .* True"),
    "pattern unknown": (dict(pattern="blocky"), ValueError, r"pattern must be .*'blocky'"),
    "pattern not str": (dict(pattern=24), TypeError, r"pattern must be a str.* 24"),
    "pattern N>M": (dict(pattern="4:2"), ValueError, r"1 <= N < M.*N=4, M=2"),
    "pattern N=M": (dict(pattern="2:2"), ValueError, r"N=2, M=2"),
    "pattern N=0": (dict(pattern="0:4"), ValueError, r"N=0, M=4"),
    "pattern M>32": (dict(pattern="2:64"), ValueError, r"M must be at most 32; got M=64"),
    "in_features % M": (dict(pattern="2:3"), ValueError, r"divisible by 3; weight has in_features=8"),
    "sparsity contradicts N:M": (dict(pattern="2:4", sparsity=0.6), ValueError, r"sparsity=0\.6 contradicts pattern '2:4'"),
    "scope layer with N:M": (dict(pattern="2:4", scope="layer"), ValueError, r"scope='layer'.*'2:4'"),
    "metric": (dict(metric="sparsegpt"), ValueError, r"metric must be one of .*'sparsegpt'"),
    "backend": (dict(backend="cuda"), ValueError, r"backend must be one of .*'cuda'"),
    "scope": (dict(scope="column"), ValueError, r"scope must be one of .*'column'"),
    "norms wrong shape": (dict(norms=torch.ones(7)), ValueError, r"norms must have shape .*\(8,\).*got \(7,\)"),
    "norms 2-D": (dict(norms=torch.ones(1, 8)), ValueError, r"got \(1, 8\)"),
    "norms negative": (dict(norms=torch.tensor([1.0] * 7 + [-2.0])), ValueError, r"norms\[7\] = -2\.0"),
    "norms NaN": (dict(norms=torch.tensor([1.0, float("nan")] + [1.0] * 6)), ValueError, r"norms\[1\] = nan"),
    "norms Inf": (dict(norms=torch.tensor([float("inf")] + [1.0] * 7)), ValueError, r"norms\[0\] = inf"),
    "norms int": (dict(norms=torch.ones(8, dtype=torch.int64)), TypeError, r"norms must be a floating tensor; got torch\.int64"),
    "norms not tensor": (dict(norms=[1.0] * 8), TypeError, r"norms must be a torch\.Tensor.*list"),
    "norms None for wanda": (dict(norms=None), ValueError, r"norms is None, but metric='wanda'"),
    "norms other device": (dict(norms=torch.ones(8, device="meta")), ValueError, r"norms is on meta but the weight is on cpu"),
}


@pytest.mark.parametrize("fn", ["prune_", "prune_mask"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_argument_raises_and_leaves_weight_unchanged(case, fn):
    kwargs, exc, message = BAD_CALLS[case]
    kwargs = dict(kwargs)
    norms = kwargs.pop("norms", GOOD_NORMS)
    w = _weight()
    before = w.clone()
    norms_before = norms.clone() if isinstance(norms, torch.Tensor) and norms.device.type != "meta" else None
    with pytest.raises(exc, match=message):
        getattr(wk, fn)(w, norms, **kwargs)
    assert _same_bits(w, before)
    if norms_before is not None:
        assert _same_bits(norms, norms_before)


@pytest.mark.parametrize(
    ("weight", "exc", "message"),
    [
        (torch.ones(8), ValueError, r"must be 2-D .*got 1-D tensor of shape \(8,\)"),
        (torch.ones(2, 4, 8), ValueError, r"got 3-D tensor of shape \(2, 4, 8\)"),
        (torch.ones(4, 8, dtype=torch.int32), TypeError, r"float16, bfloat16, float32 or float64; got torch\.int32"),
        (torch.ones(4, 8, dtype=torch.bool), TypeError, r"got torch\.bool"),
        ([[1.0] * 8] * 4, TypeError, r"nn\.Linear or a 2-D weight tensor \(or transformers' Conv1D\); got list"),
        (nn.Conv1d(8, 4, 1), TypeError, r"or transformers' Conv1D\); got Conv1d"),  # torch's Conv1d is not one
    ],
)
def test_bad_weight(weight, exc, message):
    before = weight.clone() if isinstance(weight, torch.Tensor) else None
    with pytest.raises(exc, match=message):
        wk.prune_(weight, GOOD_NORMS, 0.5)
    if before is not None:
        assert torch.equal(weight, before)


@pytest.mark.parametrize("metric", ["wanda", "magnitude"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fn", ["prune_", "prune_mask", "prune_compress_24"])
def test_non_finite_weight_is_refused_and_left_unchanged(fn, bad, metric):
    # A NaN weight would keep or lose its place arbitrarily and poison every output it
    # feeds: refused at the public boundary, naming the first bad element.
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).half()
    w[2, 5] = bad
    w[3, 1] = bad
    before = w.clone()
    norms = torch.rand(64) if metric == "wanda" else None
    kwargs = {} if fn == "prune_compress_24" else {"pattern": "2:4"}
    with pytest.raises(ValueError, match=rf"weight has non-finite values: weight\[2, 5\] = {bad!r}"):
        getattr(wk, fn)(w, norms, metric=metric, **kwargs)
    assert _same_bits(w, before)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = _weight()
    before = w.clone()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .*got tensors on cpu"):
        wk.prune_(w, GOOD_NORMS, 0.5, backend="triton")
    assert torch.equal(w, before)


def test_triton_backend_refuses_layer_scope():
    with pytest.raises(ValueError, match=r"scope='layer'.*no Triton kernel"):
        wk.prune_mask(_weight(), GOOD_NORMS, 0.5, scope="layer", backend="triton")


def test_error_messages_are_one_clear_line():
    with pytest.raises(ValueError) as info:
        wk.prune_(_weight(), GOOD_NORMS, 1.5)
    assert "\n" not in str(info.value)
    assert re.search(r"sparsity", str(info.value))


ACC_BAD = [
    (lambda: (torch.zeros(8), torch.ones(3, 7)), ValueError, r"sq_norms must have shape .*\(7,\).*got \(8,\)"),
    (lambda: (torch.zeros(8, dtype=torch.float16), torch.ones(3, 8)), TypeError, r"sq_norms must be float32.*float16"),
    (lambda: (torch.zeros(8), torch.ones(3, 8, dtype=torch.int64)), TypeError, r"x must be float16, bfloat16 or float32; got torch\.int64"),
    (lambda: (torch.zeros(8), torch.ones(3, 8, device="meta")), ValueError, r"sq_norms is on cpu but x is on meta"),
    (lambda: (torch.zeros(1), torch.tensor(1.0)), ValueError, r"x must have at least 1 dim"),
    (lambda: ([0.0] * 8, torch.ones(3, 8)), TypeError, r"sq_norms must be a torch\.Tensor; got list"),
]


@pytest.mark.parametrize(("make", "exc", "message"), ACC_BAD)
def test_accumulate_sq_norms_bad_input(make, exc, message):
    sq, x = make()
    before = sq.clone() if isinstance(sq, torch.Tensor) else None
    with pytest.raises(exc, match=message):
        wk.accumulate_sq_norms_(sq, x)
    if before is not None:
        assert torch.equal(sq, before)


def test_collector_bad_input():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module; got str"):
        wk.ActNormCollector("model")
    with pytest.raises(ValueError, match=r"no linear layer \(nn\.Linear, Conv1D\) in the model matches "
                                         r"include=\['nothing\*'\]"):
        wk.ActNormCollector(nn.Sequential(nn.Linear(2, 2)), include=["nothing*"])
    with pytest.raises(ValueError, match=r"no module of type \['Conv1d'\] in the model matches include=None"):
        wk.ActNormCollector(nn.Sequential(nn.Linear(2, 2)), module_types=(nn.Conv1d,))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        wk.ActNormCollector(nn.Linear(2, 2), backend="fast")
