"""The Hopper (sm90a) metadata layout: CUTLASS's own fill_layoutE, conversion, round trips.

The layout check compiles tests/cpp/sm90_meta_layout.cpp with plain g++ against the
CUTLASS headers (the nvidia-cutlass wheel) and CUDA's headers, evaluates
``Sm90GemmSparseConfig::fill_layoutE`` on the CPU and compares its map with ours. It
skips without g++, the headers or nvcc's include folder, except in CI (CI=true).
"""

import functools
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse24 import DTYPES, _bits, random_24

import wanda_kernels as wk
from wanda_kernels import reference
from wanda_kernels._layout24 import sm90_offsets
from wanda_kernels.gemm24 import policy
from wanda_kernels.sparse24 import meta_shape, meta_sm80_to_sm90, meta_sm90_to_sm80

STRICT = os.environ.get("CI", "").lower() == "true"
SRC = Path(__file__).parent / "cpp" / "sm90_meta_layout.cpp"


def _unavailable(why):
    (pytest.fail if STRICT else pytest.skip)(why)


def _cutlass_include():
    if os.environ.get("CUTLASS_HOME"):
        return Path(os.environ["CUTLASS_HOME"]) / "include"
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "source" / "include"


def _cuda_include():
    """CUDA's include folder (cute's headers include cuda_runtime_api.h and CCCL's cuda/std)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script: ask it where it lives.
        out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True).stderr
        roots += [line.split("TOP=", 1)[1].strip() for line in out.splitlines() if "TOP=" in line]
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


@functools.cache
def _layout_tool(tmp_root: str) -> Path:
    cutlass_inc, cuda_inc = _cutlass_include(), _cuda_include()
    if shutil.which("g++") is None:
        _unavailable("no g++")
    if cutlass_inc is None or not (cutlass_inc / "cutlass" / "gemm" / "collective" / "builders").is_dir():
        _unavailable("no CUTLASS 3.x headers (pip install nvidia-cutlass, or set CUTLASS_HOME)")
    if cuda_inc is None:
        _unavailable("no CUDA include folder (nvcc on PATH, or CUDA_HOME)")
    exe = Path(tmp_root) / "sm90_meta_layout"
    cmd = ["g++", "-std=c++17", "-O1", "-w", f"-I{cutlass_inc}", f"-I{cuda_inc}", f"-I{cuda_inc / 'cccl'}",
           str(SRC), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def layout_tool(tmp_path_factory):
    return _layout_tool(str(tmp_path_factory.mktemp("sm90")))


def cutlass_offsets(tool, m, k, dtype="f16"):
    out = subprocess.run([str(tool), str(m), str(k), dtype], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    m_pad, k_pad = (int(v) for v in lines[0].split())
    table = torch.tensor([[int(v) for v in line.split()] for line in lines[1:]], dtype=torch.int64)
    assert table.shape == (m_pad, k_pad // 4)
    return table


# (out_features, in_features) of layers: aligned, padded in M and/or K, LLaMA-like.
LAYERS = [(32, 64), (64, 128), (72, 192), (96, 320), (200, 448), (128, 4096), (256, 1024)]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize(("out_f", "in_f"), LAYERS)
def test_offsets_equal_cutlass_fill_layoutE(layout_tool, out_f, in_f, dtype):
    # The kernel's problem is (round_up(out, 8), K padded to 64) (gemm24.op.sm90_linear);
    # our conversion works from the sm80-padded (round_up(out, 32), K). Both must give
    # CUTLASS's map.
    m32, k64 = -(-out_f // 32) * 32, -(-in_f // 64) * 64
    theirs = cutlass_offsets(layout_tool, -(-out_f // 8) * 8, k64, dtype)
    ours = sm90_offsets(m32, k64)
    assert theirs.shape == ours.shape == (meta_shape(m32, k64, "sm90")[0], meta_shape(m32, k64, "sm90")[1] * 4)
    assert torch.equal(theirs, ours)


def test_offsets_are_a_permutation_of_the_padded_buffer(layout_tool):
    table = cutlass_offsets(layout_tool, 200, 448)
    assert torch.equal(torch.sort(table.reshape(-1) // 4).values, torch.arange(table.numel()))


@pytest.mark.parametrize(("out_f", "in_f"), LAYERS)
def test_library_conversion_places_every_code_where_cutlass_says(layout_tool, out_f, in_f):
    # Codes are numbered so every group is distinguishable (4 bits only: use the
    # group's row and column mod 16 through two conversions).
    m, k = -(-out_f // 32) * 32, -(-in_f // 64) * 64
    offsets = cutlass_offsets(layout_tool, m, k)
    w = random_24(m, k, torch.float16, seed=m * k)
    values, meta = wk.compress_24(w)
    e = meta_sm80_to_sm90(meta, out_f, in_f)
    e_bytes = e.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack((e_bytes & 0xF, e_bytes >> 4), dim=-1).reshape(-1)
    codes = reference.meta_codes_24(meta)
    assert torch.equal(nibbles[offsets[:m, : k // 4] // 4], codes)
    # Every padding nibble holds code 0xE (positions 2, 3): a valid code.
    pad = torch.ones(nibbles.numel(), dtype=torch.bool)
    pad[offsets[:m, : k // 4].reshape(-1) // 4] = False
    assert bool((nibbles[pad] == 0xE).all())


# ---------------------------------------------------------------------------
# Round trips, without CUTLASS.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_f", "in_f"), LAYERS)
def test_round_trip_sm80_to_sm90_decodes_to_the_same_matrix(out_f, in_f, dtype):
    m, k = -(-out_f // 32) * 32, -(-in_f // 64) * 64
    w = random_24(m, k, dtype, seed=out_f + 3 * in_f)  # groups with < 2 non-zeros, -0.0
    values, meta = wk.compress_24(w)
    e = meta_sm80_to_sm90(meta, out_f, in_f)
    assert e.shape == meta_shape(m, k, "sm90") and e.dtype == torch.int16
    dense = wk.decompress_24(values, e, meta_format="sm90")
    assert torch.equal(dense, wk.decompress_24(values, meta))
    assert torch.equal(dense, w)  # value equality: -0.0 == 0.0
    assert torch.equal(reference.decompress_24_sm90(values, e), dense)
    assert torch.equal(reference.meta_sm80_to_sm90(meta), e)
    assert torch.equal(meta_sm90_to_sm80(e, out_f, in_f), meta)
    v90, e90 = wk.compress_24(w, meta_format="sm90")
    assert torch.equal(_bits(v90), _bits(values)) and torch.equal(e90, e)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 9), seed=st.integers(0, 2**31 - 1),
       zero_frac=st.floats(0.0, 1.0))
def test_round_trip_property(rows, cols, seed, zero_frac):
    m, k = 32 * rows, 64 * cols
    w = random_24(m, k, torch.bfloat16, seed, zero_frac=zero_frac)
    values, meta = wk.compress_24(w)
    e = meta_sm80_to_sm90(meta, m, k)
    assert torch.equal(wk.decompress_24(values, e, meta_format="sm90"), w)
    assert torch.equal(meta_sm90_to_sm80(e, m, k), meta)


def test_hand_computed_positions():
    # Row 9 = m0 1, m1 1 -> 128 + 16 = 144 logical; columns 16..31 (k1 = 1) -> + 1024:
    # word (144 + 1024) / 16 = 73. Row 64, column 128 (second atom in M and in K, with
    # M64 = 128): 8192 + 128 * 128 = 24576 -> word 1536.
    offsets = sm90_offsets(128, 256)
    assert offsets[9, 4] == 1168 and offsets[9, 4] // 16 == 73
    assert offsets[64, 32] == 24576
    # A single group [0, x, 0, y] (positions 1, 3: code 1 | 3 << 2 = 0xD) at row 9,
    # columns 16..19 lands in the low nibble of byte 146 (1168 / 8).
    w = torch.zeros(128, 256, dtype=torch.float16)
    w[9, 17], w[9, 19] = 1.0, 2.0
    _, e = wk.compress_24(w, meta_format="sm90")
    e_bytes = e.reshape(-1).view(torch.uint8)
    assert int(e_bytes[146]) & 0xF == 0xD
    assert int(e_bytes[146]) >> 4 == 0xE  # columns 20..23: all zero -> (2, 3)


def test_conversion_refusals():
    _, meta = wk.compress_24(torch.zeros(64, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"meta in the sm80 format for a \(64, 256\) weight .* must be int16 of "
                                         r"shape \(64, 16\); got torch.int16 \(64, 8\)"):
        meta_sm80_to_sm90(meta, 64, 256)
    with pytest.raises(ValueError, match=r"out_features must be a positive int; got 0"):
        meta_sm80_to_sm90(meta, 0, 128)
    with pytest.raises(TypeError, match=r"meta must be a torch.Tensor; got list"):
        meta_sm80_to_sm90([1], 64, 128)
    _, meta96 = wk.compress_24(torch.zeros(96, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"meta in the sm90 format .* shape \(128, 8\); got torch.int16 \(96, 8\)"):
        meta_sm90_to_sm80(meta96, 96, 128)
    with pytest.raises(ValueError, match=r"meta_format must be one of"):
        wk.compress_24(torch.zeros(64, 128, dtype=torch.float16), meta_format="sm100")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("m", "k"), [(64, 256), (96, 128), (32, 64)])
def test_prune_compress_emits_sm90_directly(m, k, backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    g = torch.Generator().manual_seed(m + k)
    w = torch.randn(m, k, generator=g).half()
    norms = torch.rand(k, generator=g) + 0.1
    pruned = w.clone()
    wk.prune_(pruned, norms, pattern="2:4")
    want_v, want_e = wk.compress_24(pruned, meta_format="sm90")
    v, e = wk.prune_compress_24(w, norms, meta_format="sm90", backend=backend)
    assert torch.equal(_bits(v), _bits(want_v)) and torch.equal(e, want_e)


# ---------------------------------------------------------------------------
# SparseLinear keeps the metadata of the kernel that will run, and checkpoints sm80.


@pytest.fixture
def hopper_like(monkeypatch):
    """Pretend every device runs the sm90 kernel (the layout logic is device independent)."""
    monkeypatch.setattr(policy, "meta_format_for", lambda device, dtype: "sm90")


def _layer(out_f=100, in_f=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f).half()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g).half())
        wk.prune_(lin.weight, None, pattern="2:4", metric="magnitude")
    return lin


@pytest.mark.filterwarnings("ignore:SparseLinear runs dense")
def test_sparse_linear_converts_for_sm90_and_checkpoints_sm80(hopper_like, monkeypatch):
    lin = _layer()
    module = wk.SparseLinear.from_linear(lin)
    assert module.meta_format == "sm90" and module.meta.shape == meta_shape(128, 192, "sm90")
    assert "sm90" in repr(module)
    assert torch.equal(module.to_dense(), lin.weight)
    x = torch.randn(3, 192).half()
    assert torch.equal(module(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    # state_dict: sm80, the same tensor compress_24 gives (and PyTorch's packer).
    state = module.state_dict()
    _, meta80 = wk.compress_24(torch.nn.functional.pad(lin.weight, (0, 0, 0, 28)))
    assert torch.equal(state["meta"], meta80)
    # Loading an sm80 state dict into an sm90 module converts it.
    fresh = wk.SparseLinear(192, 100, dtype=torch.float16)
    assert fresh.meta_format == "sm90"
    fresh.load_state_dict(state)
    assert fresh.meta_format == "sm90" and torch.equal(fresh.meta, module.meta)
    # Moving to a device that runs the sm80 kernel (or none) converts back.
    monkeypatch.setattr(policy, "meta_format_for", lambda device, dtype: "sm80")
    fresh.to("cpu")
    assert fresh.meta_format == "sm80" and torch.equal(fresh.meta, meta80)


def test_op_refuses_a_kernel_whose_layout_the_metadata_is_not_in(monkeypatch):
    monkeypatch.setattr(policy, "select_kernel", lambda device, dtype: ("sm90", None))
    reason = policy.unavailable_reason(torch.empty(1, dtype=torch.float16), "sm80")
    assert "metadata is in the sm80 layout" in reason and ".to(device)" in reason
    assert policy.unavailable_reason(torch.empty(1, dtype=torch.float16), "sm90") is None


def test_kernel_choice_on_cpu_is_none_and_says_why():
    kernel, reason = policy.select_kernel(torch.device("cpu"), torch.float16)
    assert kernel is None and "cpu" in reason


def test_layout_conversions_cache_no_index_tensors():
    # The conversions used to keep two caches of int64 index tensors per (shape, device):
    # ~120 MB of GPU memory per 70B layer shape, held for the process's life. They are
    # now computed per call, on the tensor's device, in int32.
    from wanda_kernels import _layout24

    cached = [name for name, obj in vars(_layout24).items() if hasattr(obj, "cache_info")]
    assert cached == []
    assert _layout24.sm80_offsets(64, 8).dtype == torch.int32
    assert _layout24.sm90_offsets(64, 128).dtype == torch.int32
    assert _layout24.sm90_offsets(64, 128, groups=4).shape == (64, 8)
    assert _layout24._index_dtype(2**31) == torch.int64  # a layer past 2**31 words keeps int64
    # A LLaMA-7B gate shape still round-trips (placements are pinned against CUTLASS above).
    m, k = 11008, 4096
    e = meta_sm80_to_sm90(torch.arange(m * k // 16, dtype=torch.int32).to(torch.int16).reshape(m, k // 16), m, k)
    back = meta_sm90_to_sm80(e, m, k)
    assert torch.equal(back, torch.arange(m * k // 16, dtype=torch.int32).to(torch.int16).reshape(m, k // 16))
