"""The host side of SparseLinear's GPU path, on the CPU: what forward hands to ``_C``, and what it does not do.

A decode-sized 2:4 GEMM runs for a few microseconds, so the host work around it
decides the speed. Without a GPU the kernels cannot run, but everything before the
call into ``_C`` can: here a stand-in for ``_C`` records each launch, the kernel choice
is forced to what an H100 (sm90) or an A100 (sm80) would make, and the tensors stay
on the CPU. The tests check that

* the pointers, shapes, strides, configuration and bias reach ``_C`` as the kernels
  need them (no needless copies of the input);
* ``forward`` decides nothing per call: the kernel was chosen when the module was
  built or moved, and eager calls skip the custom op's dispatcher round trip;
* no call reads tensor data back to the host (what would break CUDA-graph capture and
  stall the launch queue), on the direct path and through the op;
* under autograd or ``torch.compile``-style tracing, the op is used (it has the fake
  implementation and fails cleanly on backward).

What these cannot show, the GPU tests do (``tests/test_gpu.py``: capture and replay in a
CUDA graph, ``torch.compile(mode="reduce-overhead")``, results against cuBLAS), and
``benchmarks/tune_sm90.py`` times the host path per layer on a GPU.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import wanda_kernels as wk
from wanda_kernels import _warn
from wanda_kernels.gemm24 import launch, op, policy
from wanda_kernels.sparse_linear import SparseLinear

STREAM = 0x5EED


def _enum(*names):
    members = {n: f"<{n}>" for n in names}
    return types.SimpleNamespace(**members, __members__=members)


class FakeExtension:
    """Stands in for ``_C``: the enums, the host-only queries, and launches that record their arguments."""

    DType = _enum("float16", "bfloat16")
    Sm80Config = _enum("decode", "large")
    Sm90Config = _enum("decode", "large", "streamk", "wide")
    Sm90Raster = _enum("heuristic", "along_m", "along_n")

    def __init__(self):
        self.launches = []

    def sm90_gemm(self, *args):
        self.launches.append(("sm90", args))
        return 0

    def sm80_gemm(self, *args):
        self.launches.append(("sm80", args))
        return 0

    def sm90_workspace_size(self, dtype, config, m, n, k, sms, swizzle, raster, splits):
        return 1024 if config == "<streamk>" else 0

    def status_string(self, status):
        return f"status {status}"


@pytest.fixture
def gpu_like(monkeypatch):
    """Returns ``use(kernel)``: from then on, SparseLinear on the CPU takes ``kernel``'s path into a FakeExtension."""
    ext = FakeExtension()
    choice = {}
    selections = []

    def select_kernel(device, dtype):
        selections.append((device, dtype))
        kernel = choice["kernel"]
        return kernel, None if kernel else "this test's device has no kernel"

    monkeypatch.setattr(policy, "select_kernel", select_kernel)
    monkeypatch.setattr(launch, "extension", lambda: ext)
    monkeypatch.setattr(launch, "sm_count", lambda index: 132)
    monkeypatch.setattr(launch, "_raw_stream_query", lambda: (lambda index: STREAM))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch._device.cache_clear()
    launch._sm90_workspace_bytes.cache_clear()

    def use(kernel):
        choice["kernel"] = kernel
        return ext, selections

    yield use
    launch._device.cache_clear()
    launch._sm90_workspace_bytes.cache_clear()


def _layer(in_f, out_f, bias=True, dtype=torch.float16):
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    wk.prune_(lin, torch.rand(in_f) + 0.1, pattern="2:4")
    return lin


class OpLog(TorchDispatchMode):
    """Every aten (and custom) op that reaches the dispatcher while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Ops that read tensor data back to the host: each one is a device synchronisation on a
# GPU, and an error during CUDA-graph capture.
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.equal",
              "aten._assert_async", "aten.allclose"}


def test_sm90_forward_hands_the_kernel_its_operands_in_place(gpu_like):
    ext, selections = gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(256, 128))
    assert sl.meta_format == "sm90" and sl._kernel_fn is op.sm90_linear
    chosen = len(selections)
    x = torch.randn(2, 3, 256).half()
    with OpLog() as log:
        y = sl(x)
    assert len(selections) == chosen, "forward chose the kernel again"
    assert y.shape == (2, 3, 128)
    (kernel, args), = ext.launches
    dtype, cfg, m, n, k, values, meta, xp, ldx, yp, ldy, bias, workspace, sms, stream, *schedule = args
    assert kernel == "sm90" and dtype == "<float16>" and cfg == "<decode>"  # 2 x 4 tiles of 64 x 32 fit one wave
    assert schedule == [1, "<heuristic>", 1]  # swizzle, raster, splits: CUTLASS's defaults
    assert (m, n, k, ldx, ldy) == (128, 6, 256, 256, 128)
    assert values == sl.values.data_ptr() and meta == sl.meta.data_ptr() and bias == sl.bias.data_ptr()
    assert xp == x.data_ptr(), "an aligned contiguous input must be read in place, not copied"
    assert yp == y.data_ptr() and workspace == 0 and sms == 132 and stream == STREAM
    # One allocation (the output), two views, nothing else: no op round trip, no host read.
    assert sorted(log.ops) == ["aten.empty", "aten.view", "aten.view"], log.ops


def test_sm90_stream_k_gets_a_workspace_and_odd_shapes_are_padded(gpu_like):
    ext, _ = gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(100, 4100))  # 4100 -> 4104 rows for the kernel; K 100 -> 128
    x = torch.randn(96, 100).half()
    with OpLog() as log:
        y = sl(x)
    (_, args), = ext.launches
    dtype, cfg, m, n, k, values, meta, xp, ldx, yp, ldy, bias, workspace, sms, stream, *schedule = args
    assert cfg == "<streamk>" and workspace != 0  # 65 x 3 decode tiles: more than a wave
    assert (m, n, k, ldx, ldy) == (4104, 96, 128, 128, 4104)
    assert xp != x.data_ptr()  # K padded: a copy
    assert y.shape == (96, 4100) and y.is_contiguous()
    assert not HOST_READS & set(log.ops), log.ops


def test_launch_sm90_hands_an_explicit_schedule_to_the_kernel_and_the_workspace_query(gpu_like, monkeypatch):
    ext, _ = gpu_like("sm90")
    queries = []
    monkeypatch.setattr(ext, "sm90_workspace_size", lambda *args: queries.append(args) or 4096)
    sl = SparseLinear.from_linear(_layer(256, 128))
    x, y = torch.randn(16, 256).half(), torch.empty(16, 128).half()
    launch.launch_sm90(sl.values, sl.meta, x, y, None, "streamk", policy.Sm90Schedule(8, "along_n", 4))
    (_, args), = ext.launches
    assert args[1] == "<streamk>" and args[-3:] == (8, "<along_n>", 4)
    assert args[12] != 0  # the workspace the query asked for
    assert queries == [("<float16>", "<streamk>", 128, 16, 256, 132, 8, "<along_n>", 4)]


def test_sm80_forward_pads_tokens_and_adds_the_bias_in_one_pass(gpu_like):
    ext, _ = gpu_like("sm80")
    sl = SparseLinear.from_linear(_layer(128, 64))
    assert sl.meta_format == "sm80" and sl._kernel_fn is op.sm80_linear
    x = torch.randn(3, 128).half()
    with OpLog() as log:
        y = sl(x)
    (kernel, args), = ext.launches
    dtype, cfg, m, n, k, values, meta, xp, ldx, dp, ldd, stream = args
    assert kernel == "sm80" and cfg == "<decode>" and (m, n, k, ldx, ldd) == (64, 8, 128, 128, 8)
    assert stream == STREAM and y.shape == (3, 64)
    assert not HOST_READS & set(log.ops), log.ops
    assert "aten.add" in log.ops  # D^T + bias written straight into y


def test_autograd_and_tracing_go_through_the_op(gpu_like):
    ext, _ = gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(256, 128))
    x = torch.randn(4, 256).half().requires_grad_()
    with OpLog() as log:
        sl(x)
    assert "wanda_kernels.sparse24_linear" in log.ops
    assert not HOST_READS & set(log.ops), log.ops
    with torch.no_grad(), OpLog() as log:
        sl(x)
    assert "wanda_kernels.sparse24_linear" not in log.ops
    assert len(ext.launches) == 2


def test_moving_the_module_chooses_again(gpu_like):
    ext, selections = gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(256, 128))
    gpu_like(None)  # as if moved to a device with no kernel
    sl.to(torch.bfloat16)
    assert sl._kernel_fn is None and sl.meta_format == "sm80"
    x = torch.randn(2, 256).bfloat16()
    _warn.forget()
    with pytest.warns(RuntimeWarning, match="dense F.linear.*this test's device has no kernel"):
        y = sl(x)
    assert not ext.launches
    assert torch.equal(y, F.linear(x, sl.to_dense(), sl.bias))


def test_a_failed_launch_names_the_layer_and_the_status(gpu_like):
    ext, _ = gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(256, 128))
    ext.sm90_gemm = lambda *args: 7
    with pytest.raises(RuntimeError, match=r"sm90a 2:4 sparse GEMM failed \(status 7\).*SparseLinear 256 -> 128, "
                                           r"input of 5 tokens"):
        sl(torch.randn(5, 256).half())


def test_torch_compile_traces_the_op_when_a_kernel_was_chosen(gpu_like):
    # With a kernel chosen, eager forward skips the op; dynamo must still see the op
    # (fullgraph: no graph break on the direct call) and run it at run time.
    ext, _ = gpu_like("sm90")
    torch._dynamo.reset()
    sl = SparseLinear.from_linear(_layer(256, 128))
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 256).half()
    with torch.no_grad():
        y = compiled(x)
    assert y.shape == (4, 128)
    (kernel, args), = ext.launches
    assert kernel == "sm90" and args[2:5] == (128, 4, 256)


def test_an_unpickled_module_chooses_its_kernel_again(gpu_like, monkeypatch):
    # torch.save(module) on a GPU box, torch.load(map_location="cpu") elsewhere: the
    # function chosen there must not be called here.
    import pickle

    gpu_like("sm90")
    sl = SparseLinear.from_linear(_layer(256, 128))
    assert sl._kernel_fn is op.sm90_linear
    blob = pickle.dumps(sl)
    monkeypatch.undo()  # back on this CPU machine: no kernel
    loaded = pickle.loads(blob)
    assert loaded._kernel_fn is None and loaded.meta_format == "sm80"  # converted back for this device
    assert torch.equal(loaded.meta, sl.meta_as("sm80"))
    x = torch.randn(2, 256).half()
    with pytest.warns(RuntimeWarning, match="dense F.linear"):
        _warn.forget()
        y = loaded(x)
    assert torch.equal(y, F.linear(x, loaded.to_dense(), loaded.bias))
