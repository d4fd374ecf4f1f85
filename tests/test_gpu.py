"""GPU tests: compiled Triton on CUDA at LLaMA shapes. Skipped without a CUDA device."""

import functools

import pytest
import torch

import wanda_kernels as wk
from wanda_kernels import reference

pytestmark = pytest.mark.gpu

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192), (512, 28672)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4"), dict(pattern="4:8")])
@pytest.mark.parametrize("metric", ["wanda", "ria"])
def test_triton_equals_torch_path_at_llama_shapes(shape, dtype, kw, metric):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(*shape, generator=g, device="cuda").to(dtype)
    norms = torch.rand(shape[1], generator=g, device="cuda")
    keep_torch = wk.prune_mask(w, norms, backend="torch", metric=metric, **kw)
    w_triton = w.clone()
    keep = wk.prune_(w_triton, norms, return_mask=True, metric=metric, **kw)  # auto -> Triton on CUDA
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
    """The kernel dispatch picks on this GPU ("sm80" or "sm90"); skip when there is none."""
    from wanda_kernels.gemm24 import select_kernel

    kernel, reason = select_kernel(torch.device("cuda"), torch.float16)
    if kernel is None:
        pytest.skip(reason)
    return kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out_f", "in_f"), [(4096, 4096), (11008, 4096), (4096, 11008), (100, 200)])
@pytest.mark.parametrize("tokens", [1, 13, 128, 2048])
def test_sparse_linear_error_within_twice_dense(out_f, in_f, tokens, dtype):
    kernel = _cutlass_ready()
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, device="cuda", dtype=dtype)
    wk.prune_(lin, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
    sl = wk.SparseLinear.from_linear(lin)
    assert sl.meta_format == kernel and sl.kernel().startswith(f"cutlass-{kernel}")
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
    # The 2:4 op is opaque to Inductor and runs the same kernel; only the fused SiLU
    # between the two layers may round differently (fp32 inside Inductor's kernel, fp16
    # round trips in eager): one fp16 ulp of the activation, scaled by the second layer's
    # row sums, stays under the dense-vs-sparse tolerance above.
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_sparse_linear_captures_and_replays_in_a_cuda_graph():
    _cutlass_ready()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 11008, device="cuda", dtype=torch.float16)
    wk.prune_(lin, torch.rand(4096, device="cuda") + 0.1, pattern="2:4")
    sl = wk.SparseLinear.from_linear(lin)
    for tokens in (1, 16, 300):
        _assert_graph_replay_reads_new_input(sl, torch.randn(tokens, 4096, device="cuda", dtype=torch.float16))


def test_permuted_sparse_linear_equals_the_dense_layer_and_replays_in_a_cuda_graph():
    _cutlass_ready()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.float16)
    perm = torch.randperm(4096, device="cuda")
    w = lin.weight.data[:, perm]
    wk.prune_(w, torch.rand(4096, device="cuda") + 0.1, pattern="2:4")
    lin.weight.data[:, perm] = w  # 2:4 only in the permuted input order
    sl = wk.SparseLinear.from_linear(lin, perm=perm)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(sl(x).float(), lin(x).float(), rtol=2e-2, atol=2e-2)
    _assert_graph_replay_reads_new_input(sl, x)


def _assert_graph_replay_reads_new_input(module, x):
    """Capture ``module(x)`` in a CUDA graph, refill ``x``, replay: the output must be
    ``module(new x)`` bit for bit (same kernel, same inputs), and differ from the old one."""
    before = module(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(x)  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, module(x)), tuple(x.shape)
    assert not torch.equal(y, before)


def test_sparse_linear_direct_path_equals_the_op_and_never_syncs():
    # Eager forward calls the kernel function chosen at construction; the op (what
    # torch.compile and autograd see) must give the same bits. Neither may synchronise
    # with the host: sync debug mode "error" raises on any synchronising CUDA call.
    _cutlass_ready()
    torch.manual_seed(0)
    for in_f, out_f, bias in ((4096, 11008, False), (100, 4100, True)):
        lin = torch.nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=torch.bfloat16)
        wk.prune_(lin, torch.rand(in_f, device="cuda") + 0.1, pattern="2:4")
        sl = wk.SparseLinear.from_linear(lin)
        assert sl._kernel_fn is not None, sl.kernel()
        for tokens in (1, 16, 96, 300):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            sl(x)  # first call: CUTLASS and the allocator warm up outside the check
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    direct = sl(x)
                via_op = torch.ops.wanda_kernels.sparse24_linear(x, sl.values, sl.meta, sl.bias, out_f, sl.meta_format)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(direct, via_op), (in_f, out_f, tokens)


def test_sparse_linear_under_reduce_overhead_compile():
    # torch.compile(mode="reduce-overhead") captures the op in CUDA graphs and replays them.
    _cutlass_ready()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.float16)
    wk.prune_(lin, torch.rand(4096, device="cuda") + 0.1, pattern="2:4")
    sl = wk.SparseLinear.from_linear(lin)
    compiled = torch.compile(sl, mode="reduce-overhead", fullgraph=True)
    for tokens in (1, 16):
        for step in range(4):  # the first calls record; later ones replay the graph
            x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
            y = compiled(x).clone()  # a replay's output is overwritten by the next replay
            # Same kernel, same inputs: the same bits as eager.
            assert torch.equal(y, sl(x)), (tokens, step)


def test_prune_compress_on_gpu_equals_torch_path():
    g = torch.Generator(device="cuda").manual_seed(4)
    w = torch.randn(4096, 11008, generator=g, device="cuda").half()
    norms = torch.rand(11008, generator=g, device="cuda")
    v, m = wk.prune_compress_24(w, norms)  # Triton on CUDA
    tv, tm = wk.prune_compress_24(w, norms, backend="torch")
    assert torch.equal(v.view(torch.int16), tv.view(torch.int16)) and torch.equal(m, tm)


# ---------------------------------------------------------------------------
# Hopper: the sm90a kernels (compute capability 9.0 only).


def _random_24(m, k, dtype, seed, zero_frac=0.15):
    """A random 2:4 weight with extra zeros (groups with < 2 non-zeros) and -0.0s (no hypothesis needed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).to(dtype)
    w = w.masked_fill(~reference.nm_mask(torch.rand(m, k, generator=g), 2, 4), 0)
    return w.masked_fill(torch.rand(m, k, generator=g) < zero_frac, -0.0)


def _hopper():
    from wanda_kernels.gemm24 import sm90_built

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the sm90a kernels run on compute capability 9.0; this GPU is {torch.cuda.get_device_capability()}")
    if not sm90_built():
        pytest.skip("wanda_kernels._C was built without the sm90a kernels")


def _pruned(out_f, in_f, dtype, seed=0, bias=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=dtype)
    wk.prune_(lin, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
    return lin, g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["decode", "large", "streamk", "wide"])
@pytest.mark.parametrize(("out_f", "in_f"), [(4096, 4096), (11008, 4096), (4096, 11008), (104, 192)])
@pytest.mark.parametrize("tokens", [1, 13, 128, 2048])
@pytest.mark.parametrize("bias", [True, False])
def test_sm90_each_config_error_within_twice_dense(out_f, in_f, tokens, dtype, config, bias):
    from wanda_kernels.gemm24 import launch_sm90

    _hopper()
    lin, g = _pruned(out_f, in_f, dtype, bias=bias)
    sl = wk.SparseLinear.from_linear(lin)
    assert sl.meta_format == "sm90"
    x = torch.randn(tokens, in_f, generator=g, device="cuda", dtype=dtype)
    y = torch.full((tokens, out_f), float("nan"), device="cuda", dtype=dtype)
    launch_sm90(sl.values, sl.meta, x, y, sl.bias, config)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    dense_err = (torch.nn.functional.linear(x, lin.weight, lin.bias).float() - ref).abs().max()
    sparse_err = (y.float() - ref).abs().max()
    assert not y.isnan().any()
    assert sparse_err <= 2 * dense_err + 1e-6, (float(sparse_err), float(dense_err))


SCHEDULE_CASES = [(cfg, (swizzle, raster, 1)) for cfg in ("large", "wide") for swizzle in (1, 2, 4, 8)
                  for raster in ("heuristic", "along_m", "along_n")]
SCHEDULE_CASES += [("streamk", (1, "heuristic", splits)) for splits in (2, 4, 8, 16)]
SCHEDULE_CASES += [("streamk", (4, "along_n", 3))]


@pytest.mark.parametrize(("config", "schedule"), SCHEDULE_CASES)
@pytest.mark.parametrize(("out_f", "in_f", "tokens"), [(4096, 4096, 2048), (1024, 8192, 16), (104, 192, 13)])
def test_sm90_every_schedule_error_within_twice_dense(config, schedule, out_f, in_f, tokens):
    # A schedule only reorders (or, split-K, slices and reduces) the tiles: the result
    # must stay as close to fp32 as cuBLAS's, with every output written.
    from wanda_kernels.gemm24 import Sm90Schedule, launch_sm90

    _hopper()
    lin, g = _pruned(out_f, in_f, torch.float16, bias=True)
    sl = wk.SparseLinear.from_linear(lin)
    x = torch.randn(tokens, in_f, generator=g, device="cuda", dtype=torch.float16)
    y = torch.full((tokens, out_f), float("nan"), device="cuda", dtype=torch.float16)
    launch_sm90(sl.values, sl.meta, x, y, sl.bias, config, Sm90Schedule(*schedule))
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    dense_err = (torch.nn.functional.linear(x, lin.weight, lin.bias).float() - ref).abs().max()
    assert not y.isnan().any()
    assert (y.float() - ref).abs().max() <= 2 * dense_err + 1e-6


def test_sm90_schedule_rule_runs_on_every_llama_shape():
    # The schedules policy.sm90_schedule_for picks are accepted by CUTLASS for every
    # LLaMA shape and token count of the benchmarks (a bad pick fails at launch).
    from wanda_kernels.gemm24 import launch_sm90

    _hopper()
    for out_f, in_f in [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192), (8192, 28672)]:
        lin, g = _pruned(out_f, in_f, torch.float16)
        sl = wk.SparseLinear.from_linear(lin)
        for tokens in (1, 16, 128, 2048, 8192):
            x = torch.randn(tokens, in_f, generator=g, device="cuda", dtype=torch.float16)
            y = torch.empty(tokens, out_f, device="cuda", dtype=torch.float16)
            launch_sm90(sl.values, sl.meta, x, y)
            ref = torch.nn.functional.linear(x.float(), lin.weight.float())
            dense_err = (torch.nn.functional.linear(x, lin.weight).float() - ref).abs().max()
            assert (y.float() - ref).abs().max() <= 2 * dense_err + 1e-6, (out_f, in_f, tokens)


def test_sm90_module_layout_follows_the_device_and_checkpoints_sm80():
    _hopper()
    lin, g = _pruned(4096, 4096, torch.float16)
    sl = wk.SparseLinear.from_linear(lin)
    assert sl.meta_format == "sm90" and sl.kernel().startswith("cutlass-sm90a")
    state = sl.state_dict()
    assert torch.equal(state["meta"].cpu(), wk.compress_24(lin.weight.detach().cpu())[1])
    sl.cpu()
    assert sl.meta_format == "sm80" and torch.equal(sl.meta, state["meta"].cpu())
    sl.cuda()
    assert sl.meta_format == "sm90"
    x = torch.randn(5, 4096, generator=g, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-2, atol=1e-2)


def test_sm90_prune_compress_on_gpu_equals_torch_path():
    g = torch.Generator(device="cuda").manual_seed(5)
    w = torch.randn(4096, 11008, generator=g, device="cuda").bfloat16()
    norms = torch.rand(11008, generator=g, device="cuda")
    v, e = wk.prune_compress_24(w, norms, meta_format="sm90")  # Triton on CUDA
    tv, te = wk.prune_compress_24(w, norms, meta_format="sm90", backend="torch")
    assert torch.equal(v.view(torch.int16), tv.view(torch.int16)) and torch.equal(e, te)


def test_sm80_kernel_still_runs_on_hopper():
    # The benchmark's sm80 column on H100/H200: the sm_90 build of the sm80 kernel.
    from wanda_kernels.gemm24 import launch_sm80, runs_on

    _hopper()
    if not runs_on(9, 0):
        pytest.skip("no sm_90 build of the sm80 kernel")
    lin, g = _pruned(4096, 4096, torch.float16, bias=False)
    values, meta = wk.compress_24(lin.weight.detach())
    x = torch.randn(16, 4096, generator=g, device="cuda", dtype=torch.float16)
    d = torch.empty(4096, 16, device="cuda", dtype=torch.float16)
    launch_sm80(values, meta, x, d)
    torch.testing.assert_close(d.t(), lin(x), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "k"), [(256, 512), (4096, 4096)])
def test_sm90_cutlass_compressor_and_our_conversion_decode_the_same(m, k, dtype):
    from wanda_kernels.gemm24 import extension, sm_count
    from wanda_kernels.sparse24 import meta_shape, meta_sm80_to_sm90

    _hopper()
    ext = extension()
    w = _random_24(m, k, dtype, seed=m + k).cuda()  # groups with < 2 non-zeros, and -0.0
    values_c = torch.empty(m, k // 2, dtype=dtype, device="cuda")
    meta_c = torch.empty(meta_shape(m, k, "sm90"), dtype=torch.int16, device="cuda")
    sms = sm_count(torch.cuda.current_device())
    dt = ext.DType.float16 if dtype == torch.float16 else ext.DType.bfloat16
    ws_bytes = ext.sm90_compress_workspace_size(dt, m, k, sms)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    status = ext.sm90_compress(dt, m, k, w.data_ptr(), values_c.data_ptr(), meta_c.data_ptr(), ws.data_ptr(), sms,
                               torch.cuda.current_stream().cuda_stream)
    assert status == 0, ext.status_string(status)
    torch.cuda.synchronize()
    theirs = wk.decompress_24(values_c, meta_c, meta_format="sm90")
    values, meta = wk.compress_24(w)
    ours = wk.decompress_24(values, meta_sm80_to_sm90(meta, m, k), meta_format="sm90")
    # Valid codes of groups with < 2 non-zeros differ between the two compressors:
    # compare decoded matrices (value equality, -0.0 == 0.0).
    assert torch.equal(theirs, ours) and torch.equal(ours, w)


# ---------------------------------------------------------------------------
# The bitmap format's Triton kernel (unstructured sparsity)


def _bitmap_layer(out_f, in_f, dtype, sparsity=0.5, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias, device="cuda", dtype=dtype)
    wk.prune_(lin, torch.rand(in_f, device="cuda") + 0.1, sparsity)
    return lin, wk.BitmapLinear.from_linear(lin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out_f", "in_f"), [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192), (100, 200)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 13, 16, 128, 2048])
def test_bitmap_linear_error_within_twice_dense(out_f, in_f, tokens, dtype):
    lin, bl = _bitmap_layer(out_f, in_f, dtype)
    assert bl.kernel() == "triton bitmap" and bl.row_offsets is None
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
        dense_err = (lin(x).float() - ref).abs().max()
        y = bl(x)
    assert y.shape == (tokens, out_f) and y.is_contiguous()
    # Both round an fp32 accumulation of the same exact products to dtype; order differs.
    assert (y.float() - ref).abs().max() <= 2 * dense_err + 1e-6


def test_bitmap_linear_unequal_rows_on_gpu_equals_the_reference():
    torch.manual_seed(0)
    w = torch.randn(300, 3000, device="cuda", dtype=torch.float16)
    mask = torch.rand(300, 3000, device="cuda") < 0.4
    bl = wk.BitmapLinear.from_dense(w, None, mask)
    assert bl.row_offsets is not None
    x = torch.randn(5, 3000, device="cuda", dtype=torch.float16)
    ref = reference.bitmap_linear(x.cpu(), bl.values.cpu(), bl.bitmap.cpu(), None, bl.row_offsets.cpu())
    torch.testing.assert_close(bl(x).float().cpu(), ref, rtol=2e-3, atol=2e-2)


def test_bitmap_linear_direct_path_equals_the_op_never_syncs_and_replays_in_a_graph():
    lin, bl = _bitmap_layer(11008, 4096, torch.float16)
    for tokens in (1, 16, 300):
        x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
        bl(x)  # compile and warm up outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                direct = bl(x)
            via_op = torch.ops.wanda_kernels.bitmap_linear(x, bl.values, bl.bitmap, bl.chunks, bl.bias, "auto")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(direct, via_op), tokens
        _assert_graph_replay_reads_new_input(bl, x)


def test_bitmap_sparsify_and_compile_on_gpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 11008), torch.nn.SiLU(), torch.nn.Linear(11008, 4096))
    model = model.cuda().half()
    for lin in (model[0], model[2]):
        wk.prune_(lin, torch.rand(lin.in_features, device="cuda") + 0.1, 0.5)
    x = torch.randn(2, 7, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        assert wk.sparsify_(model, format="bitmap") == ["0", "2"]
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(eager, expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)  # see test_sparse_linear_compiles_and_batches


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_gpt2_conv1d_pruned_by_triton_and_sparsified_on_gpu(fmt):
    # GPT-2's c_fc: transformers' Conv1D 768 -> 3072, weight stored (768, 3072). The Triton
    # mask kernel prunes its (out, in) view, strides (1, 3072), in place; the sparse module
    # built from it computes the same x @ W + b.
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    if fmt == "2:4":
        _cutlass_ready()
    torch.manual_seed(0)
    conv = Conv1D(3072, 768).cuda().half()
    norms = torch.rand(768, device="cuda") + 0.1
    kw = dict(pattern="2:4") if fmt == "2:4" else dict(sparsity=0.5)
    expected = wk.prune_mask(conv.weight.detach().t().contiguous(), norms, backend="torch", **kw)
    keep = wk.prune_(conv, norms, return_mask=True, **kw)  # auto -> Triton on CUDA
    assert torch.equal(keep, expected)
    assert not conv.weight.detach().t()[~expected].any()  # every pruned weight is zero, in the stored (in, out)
    model = torch.nn.Sequential(conv)
    x = torch.randn(2, 7, 768, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = conv(x)
        assert wk.sparsify_(model, format=fmt) == ["0"]
        y = model(x)
    assert not isinstance(model[0], Conv1D) and not model[0].kernel().startswith("dense"), model[0].kernel()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)  # fp16 sums in another order


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_fused_experts_pruned_on_gpu_like_on_cpu(family):
    # gpt-oss's experts: 3-D (experts, in, out) weights with biases, routed by index; Llama
    # 4's: stacked router-scaled rows, found by one probe call of their forward (on the
    # GPU, in the model's dtype). On CUDA the per-expert views are strided (out, in) views
    # that the Triton kernels prune in place, and the replay sorts and counts tokens (or
    # the nonzero rows) on the device.
    pytest.importorskip("transformers")
    import test_experts
    from test_pipeline import calib_ids, pruned_weights

    from wanda_kernels.llm import pipeline

    build = test_experts._gpt_oss if family == "gpt_oss" else functools.partial(test_experts._llama4, experts=4, top_k=2)
    calib = calib_ids(n=4)
    cpu, gpu = build(), build().cuda()
    pipeline.prune_model(cpu, calib, pattern="2:4", progress=False, backend="torch")
    report = pipeline.prune_model(gpu, calib, pattern="2:4", progress=False)  # auto: Triton on CUDA
    assert report.expert_linears == 2 * 4 * 2
    want, got = pruned_weights(cpu), pruned_weights(gpu)
    for name, w in got.items():
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name
        # fp32 norms summed in another order can swap a near-tie; nothing more
        assert (w.cpu().ne(0) == want[name].ne(0)).float().mean() > 0.999, name
