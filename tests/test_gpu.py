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
