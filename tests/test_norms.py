"""accumulate_sq_norms_ against an fp64 reference, and ActNormCollector on a small model."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import wanda_kernels as wk
from wanda_kernels import reference


def _fp32_sum_bound(ref64: torch.Tensor, n_terms: int) -> torch.Tensor:
    """Error bound of an fp32 sum of ``n_terms`` non-negative terms (each x**2 rounded once).

    Any summation order: |err| <= (n_terms + 1) * u * sum, u = 2**-24 (Higham, eq. 4.4),
    plus the final rounding. Non-negative terms make the sum itself the scale.
    """
    return (n_terms + 2) * 2.0**-24 * ref64 + 1e-30


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulate_matches_fp64_over_batches(backend, dtype, request):
    dev = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    cols = 200  # not a multiple of the kernel's column block
    sq = torch.zeros(cols, device=dev)
    ref = torch.zeros(cols, dtype=torch.float64)
    tokens = 0
    for shape in [(3, 50, cols), (77, cols), (1, 1, 1, cols)]:  # leading dims of every kind
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        wk.accumulate_sq_norms_(sq, x.to(dev), backend=backend)
        ref = reference.accumulate_sq_norms(ref, x)
        tokens += x.numel() // cols
    err = (sq.cpu().double() - ref).abs()
    assert (err <= _fp32_sum_bound(ref, tokens)).all(), float((err / ref).max())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulate_strided_input(backend, request):
    dev = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    big = torch.randn(40, 2, 96, generator=g).to(torch.bfloat16).to(dev)
    views = [
        big[:, 0, :],  # row stride 192: a 2-D strided view, no copy
        big.transpose(0, 2)[:, 1, :].t(),  # column stride 192, row stride 1
        big[::3, :, ::2],  # leading dims that cannot collapse into one stride
    ]
    for x in views:
        sq = torch.zeros(x.shape[-1], device=dev)
        wk.accumulate_sq_norms_(sq, x, backend=backend)
        ref = reference.accumulate_sq_norms(torch.zeros(x.shape[-1]), x.cpu())
        n = x.numel() // x.shape[-1]
        assert ((sq.cpu().double() - ref).abs() <= _fp32_sum_bound(ref, n)).all()


def test_accumulate_many_tokens_per_program(triton_device):
    # 40001 tokens x 8 features: each program loops over several token blocks
    # (ITERS > 1) and the last one ends in a ragged tail.
    from wanda_kernels.kernels import act_norms

    x = torch.randn(40001, 8, generator=torch.Generator().manual_seed(2))
    sq = torch.zeros(8, device=triton_device)
    wk.accumulate_sq_norms_(sq, x.to(triton_device), backend="triton")
    ref = reference.accumulate_sq_norms(torch.zeros(8), x)
    assert ((sq.cpu().double() - ref).abs() <= _fp32_sum_bound(ref, x.shape[0])).all()
    assert act_norms._MAX_ITERS >= 2


def test_accumulate_empty_is_a_no_op():
    sq = torch.full((5,), 2.0)
    wk.accumulate_sq_norms_(sq, torch.empty(0, 5))
    assert torch.equal(sq, torch.full((5,), 2.0))


def test_accumulate_non_contiguous_sq_norms(triton_device):
    buf = torch.zeros(2, 16, device=triton_device)
    sq = buf[:, 3]  # stride 16: the launcher accumulates into a contiguous copy
    x = torch.ones(3, 2, device=triton_device)
    wk.accumulate_sq_norms_(sq, x, backend="triton")
    assert buf[:, 3].tolist() == [3.0, 3.0] and int((buf != 0).sum()) == 2


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.mlp(self.attn(x))


def test_collector_norms_equal_reference_and_hooks_go_away():
    torch.manual_seed(0)
    model = _Block()
    batches = [torch.randn(2, 5, 16), torch.randn(7, 16)]
    with wk.ActNormCollector(model) as col:
        for b in batches:
            model(b)
    assert col.module_names == ["attn", "mlp.0", "mlp.2"]
    norms = col.norms()
    # The inputs each Linear saw, recomputed by hand.
    with torch.no_grad():
        seen = {"attn": batches, "mlp.0": [model.attn(b) for b in batches]}
        seen["mlp.2"] = [torch.relu(model.mlp[0](h)) for h in seen["mlp.0"]]
    for name, xs in seen.items():
        ref = torch.zeros(xs[0].shape[-1], dtype=torch.float64)
        for x in xs:
            ref = reference.accumulate_sq_norms(ref, x)
        torch.testing.assert_close(norms[name].double(), ref.sqrt(), rtol=1e-6, atol=0)
        assert col.num_tokens()[name] == 17
    # After the with-block the hooks are gone: more forwards change nothing.
    model(torch.randn(3, 16))
    assert all(torch.equal(col.norms()[k], norms[k]) for k in norms)
    assert not model.attn._forward_pre_hooks


def test_collector_include_patterns_and_reset():
    model = _Block()
    with wk.ActNormCollector(model, include=["mlp.*"]) as col:
        model(torch.randn(4, 16))
        assert set(col.norms()) == {"mlp.0", "mlp.2"}
        col.reset()
        assert col.norms() == {}
        model(torch.randn(4, 16))
    assert set(col.norms()) == {"mlp.0", "mlp.2"}
    with wk.ActNormCollector(model, include=lambda name, mod: mod.out_features == 32) as col:
        model(torch.randn(1, 16))
    assert list(col.norms()) == ["mlp.0"]


def test_collector_cannot_be_entered_twice():
    col = wk.ActNormCollector(nn.Linear(2, 2))
    with col, pytest.raises(RuntimeError, match="already active"):
        col.__enter__()


def test_collector_then_prune_end_to_end():
    torch.manual_seed(0)
    model = _Block()
    with wk.ActNormCollector(model) as col:
        model(torch.randn(64, 16))
    for name, norms in col.norms().items():
        lin = model.get_submodule(name)
        expected, _ = reference.prune(lin.weight.detach(), norms, 0.5)
        wk.prune_(lin, norms, 0.5)
        assert torch.equal(lin.weight.detach(), expected)


def test_collector_hooks_gpt2_conv1d_layers_and_the_docstring_recipe_prunes_them():
    # GPT-2's linear layers are transformers' Conv1D (weight (in, out)): hooked by
    # default like nn.Linear, and prune_ takes them (through their (out, in) view).
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    block = nn.Sequential(Conv1D(48, 16), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(3, 5, 16)
    with wk.ActNormCollector(block) as col:
        block(x)
    assert col.module_names == ["0", "2"]
    with torch.no_grad():
        seen = {"0": x, "2": torch.relu(block[0](x))}
    for name, inputs in seen.items():
        ref = reference.accumulate_sq_norms(torch.zeros(inputs.shape[-1], dtype=torch.float64), inputs)
        torch.testing.assert_close(col.norms()[name].double(), ref.sqrt(), rtol=1e-6, atol=0)
    for name, norms in col.norms().items():
        layer = block.get_submodule(name)
        out_in = layer.weight.detach().t() if name == "0" else layer.weight.detach()
        expected, _ = reference.prune(out_in.clone(), norms, 0.5)
        wk.prune_(layer, norms, 0.5)
        assert torch.equal(out_in, expected), name
    with wk.ActNormCollector(block, module_types=(nn.Linear,)) as col:  # the classes given, only
        block(x)
    assert col.module_names == ["2"]


def test_import_needs_no_triton_and_no_gpu():
    # `import wanda_kernels` must not import Triton or initialise CUDA.
    code = ("import sys, torch, wanda_kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)
