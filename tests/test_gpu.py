"""GPU tests: compiled Triton on CUDA at LLaMA shapes. Skipped without a CUDA device."""

import pytest
import torch

import wanda_kernels as wk
from wanda_kernels import reference

pytestmark = pytest.mark.gpu

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192), (512, 28672)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4"), dict(pattern="4:8")])
def test_triton_equals_torch_path_at_llama_shapes(shape, dtype, kw):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(*shape, generator=g, device="cuda").to(dtype)
    norms = torch.rand(shape[1], generator=g, device="cuda")
    keep_torch = wk.prune_mask(w, norms, backend="torch", **kw)
    w_triton = w.clone()
    keep = wk.prune_(w_triton, norms, return_mask=True, **kw)  # auto -> Triton on CUDA
    assert torch.equal(keep, keep_torch)
    assert torch.equal(w_triton, w.masked_fill(~keep_torch, 0))
    if "sparsity" in kw:
        assert (~keep).sum(1).eq(reference.num_pruned(shape[1], 0.5)).all()


def test_triton_equals_reference_with_ties_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randint(-2, 3, (256, 4096), generator=g, device="cuda").half()
    norms = torch.randint(0, 3, (4096,), generator=g, device="cuda").float()
    for kw in (dict(sparsity=0.5), dict(sparsity=0.7), dict(pattern="2:4"), dict(pattern="5:12")):
        if "pattern" in kw and 4096 % int(kw["pattern"].split(":")[1]):
            continue
        keep = wk.prune_mask(w, norms, backend="triton", **kw)
        assert torch.equal(keep.cpu(), reference.keep_mask(w.cpu(), norms.cpu(), **kw)), kw


def test_accumulate_on_gpu_matches_fp64():
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(8, 2048, 4096, generator=g, device="cuda").to(torch.bfloat16)
    sq = torch.zeros(4096, device="cuda")
    wk.accumulate_sq_norms_(sq, x)
    ref = reference.accumulate_sq_norms(torch.zeros(4096, dtype=torch.float64, device="cuda"), x)
    bound = (x.shape[0] * x.shape[1] + 2) * 2.0**-24 * ref
    assert ((sq.double() - ref).abs() <= bound).all()
    # Deterministic: the same input gives the same bits.
    sq2 = torch.zeros(4096, device="cuda")
    wk.accumulate_sq_norms_(sq2, x)
    assert torch.equal(sq, sq2)


def test_collector_and_prune_on_gpu_linear():
    lin = torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.float16)
    with wk.ActNormCollector(lin) as col:
        lin(torch.randn(4, 512, 4096, device="cuda", dtype=torch.float16))
    norms = col.norms()[""]
    expected, _ = reference.prune(lin.weight.detach(), norms, 0.5)
    wk.prune_(lin, norms, 0.5)
    assert torch.equal(lin.weight.detach(), expected)


def test_second_gpu_if_present():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    w = torch.randn(64, 256, device="cuda:1", dtype=torch.float16)
    norms = torch.rand(256, device="cuda:1")
    keep = wk.prune_mask(w, norms, 0.5)
    assert keep.device == w.device
    assert torch.equal(keep.cpu(), reference.keep_mask(w.cpu(), norms.cpu(), 0.5))


# ---------------------------------------------------------------------------
# 2:4 sparse inference on the GPU (CUTLASS kernel of the compiled extension).

def _cutlass_ready():
    from wanda_kernels.sparse_linear import cutlass_unavailable_reason

    reason = cutlass_unavailable_reason(torch.empty(1, device="cuda", dtype=torch.float16))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out_f", "in_f"), [(4096, 4096), (11008, 4096), (4096, 11008), (100, 200)])
@pytest.mark.parametrize("tokens", [1, 13, 128, 2048])
def test_sparse_linear_error_within_twice_dense(out_f, in_f, tokens, dtype):
    _cutlass_ready()
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, device="cuda", dtype=dtype)
    wk.prune_(lin, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
    sl = wk.SparseLinear.from_linear(lin)
    assert sl.backend() == "cutlass-2:4"
    x = torch.randn(tokens, in_f, generator=g, device="cuda", dtype=dtype)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    dense_err = (torch.nn.functional.linear(x, lin.weight, lin.bias).float() - ref).abs().max()
    y = sl(x)
    assert y.shape == (tokens, out_f) and y.is_contiguous()
    sparse_err = (y.float() - ref).abs().max()
    # Both round the same fp32 accumulation to dtype; summation order differs.
    assert sparse_err <= 2 * dense_err + 1e-6, (float(sparse_err), float(dense_err))


def test_sparse_linear_compiles_and_batches():
    _cutlass_ready()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 11008), torch.nn.SiLU(), torch.nn.Linear(11008, 4096))
    model = model.cuda().half()
    for lin in (model[0], model[2]):
        wk.prune_(lin, torch.rand(lin.in_features, device="cuda") + 0.1, pattern="2:4")
    x = torch.randn(2, 7, 4096, device="cuda", dtype=torch.float16)
    expected = model(x)
    assert wk.sparsify_(model) == ["0", "2"]
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(eager, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_prune_compress_on_gpu_equals_torch_path():
    g = torch.Generator(device="cuda").manual_seed(4)
    w = torch.randn(4096, 11008, generator=g, device="cuda").half()
    norms = torch.rand(11008, generator=g, device="cuda")
    v, m = wk.prune_compress_24(w, norms)  # Triton on CUDA
    tv, tm = wk.prune_compress_24(w, norms, backend="torch")
    assert torch.equal(v.view(torch.int16), tv.view(torch.int16)) and torch.equal(m, tm)
