"""The compiled extension's host side: loads without a GPU, checks arguments, runs CUTLASS's can_implement.

Built by `pip install .` wherever nvcc exists (CI included). Without it these tests
skip, except in CI (CI=true) on a machine with nvcc and no WANDA_KERNELS_SKIP_CUDA_BUILD,
where a missing _C is a failure.
"""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import wanda_kernels
from wanda_kernels.gemm24 import SM90_RASTERS
from wanda_kernels.gemm24 import loader as _ext

P = 0x10000  # a 16-byte aligned stand-in pointer: can_implement never dereferences


@pytest.fixture(scope="module")
def ext():
    mod = _ext.extension()
    if mod is None:
        deliberately_skipped = os.environ.get("WANDA_KERNELS_SKIP_CUDA_BUILD", "") not in ("", "0")
        if os.environ.get("CI", "").lower() == "true" and shutil.which("nvcc") and not deliberately_skipped:
            pytest.fail(f"CI has nvcc but the extension did not build: {_ext.extension_error()}")
        pytest.skip(_ext.extension_error())
    return mod


def test_extension_links_no_libtorch_and_static_cudart(ext):
    with open(ext.__file__, "rb") as fh:
        blob = fh.read()
    assert b"libcudart.so" not in blob  # cudart is linked statically
    assert b"libtorch" not in blob and b"libc10" not in blob


def _cuobjdump():
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("no cuobjdump in this Triton wheel")
    return tool


def test_shared_object_has_sparse_tensor_core_kernels_for_each_arch(ext):
    # cuobjdump ships in Triton's wheel; the .so must hold sm_80 and sm_90 cubins whose
    # SASS uses the sparse MMA (HMMA.*.SP).
    tool = _cuobjdump()
    elfs = subprocess.run([str(tool), "-lelf", ext.__file__], capture_output=True, text=True, check=True).stdout
    for arch in _ext.built_archs():
        assert f"sm_{arch}" in elfs, elfs
    sass = subprocess.run([str(tool), "-sass", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert sum(1 for line in sass.splitlines() if "HMMA" in line and ".SP" in line) > 0


def test_build_info(ext):
    assert _ext.built_archs() == sorted({int(a.rstrip("a")) for a in ext.cuda_archs.split(",")})
    assert ext.sm90_built() == ("90a" in ext.cuda_archs.split(",")) == _ext.sm90_built()
    assert set(_ext.built_archs()) >= {80} and all(a >= 80 for a in _ext.built_archs())
    assert ext.cutlass_version.count(".") == 2
    assert ext.sm80_config_shape(ext.Sm80Config.decode) == (64, 64, 64, 8)
    assert ext.sm80_config_shape(ext.Sm80Config.large) == (128, 128, 64, 8)


@pytest.fixture(scope="module")
def sm90a_cubins(ext, tmp_path_factory):
    """The sm_90a cubins of _C, extracted (decompressed) by cuobjdump."""
    if not ext.sm90_built():
        pytest.skip(f"built without the sm90a kernels (architectures {ext.cuda_archs})")
    tool = _cuobjdump()
    out = tmp_path_factory.mktemp("cubins")
    subprocess.run([str(tool), "-xelf", "all", ext.__file__], cwd=out, capture_output=True, check=True)
    cubins = sorted(out.glob("*.sm_90a.cubin"))
    assert cubins, sorted(p.name for p in out.iterdir())
    return tool, cubins


def test_sm90a_kernels_use_sparse_wgmma(sm90a_cubins):
    # wgmma.mma_async.sp in PTX becomes HGMMA.<shape>.SP in Hopper SASS: one per
    # (dtype, configuration) kernel, with the tile widths of sm90_config_shape.
    tool, cubins = sm90a_cubins
    shapes = set()
    for cubin in cubins:
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        shapes |= {tok.split(".")[2] for tok in sass.split() if tok.startswith("HGMMA.SP.")}
    assert {"64x32x32", "64x128x32", "64x256x32"} <= shapes, shapes


def test_sm90a_kernels_have_no_arch_conditional_abort(sm90a_cubins):
    # Built for plain sm_90, CUTLASS replaces the sparse wgmma by a printf of "Arch
    # conditional MMA instruction used without targeting appropriate compute capability"
    # and a trap; that text must not be in any cubin of the sm90a kernels.
    _, cubins = sm90a_cubins
    for cubin in cubins:
        assert b"Arch conditional" not in cubin.read_bytes(), cubin.name


SM90_SHAPES = [(4096, 1, 4096), (4096, 16, 4096), (11008, 2048, 4096), (4096, 8192, 11008), (8192, 1, 28672),
               (104, 3, 192)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("config", ["decode", "large", "streamk", "wide"])
@pytest.mark.parametrize(("m", "n", "k"), SM90_SHAPES)
def test_sm90_can_implement_llama_and_odd_shapes(ext, dtype, config, m, n, k):
    dtype, config = getattr(ext.DType, dtype), getattr(ext.Sm90Config, config)
    if not ext.sm90_built():
        pytest.skip("built without the sm90a kernels")
    assert ext.sm90_can_implement(dtype, config, m, n, k, P, P, P, k, P, m, 0, 132) == 0
    assert ext.sm90_can_implement(dtype, config, m, n, k, P, P, P, k, P, m, P, 132) == 0  # with a bias


def test_sm90_workspace_only_for_stream_k(ext):
    if not ext.sm90_built():
        pytest.skip("built without the sm90a kernels")
    f16, bf16, cfg = ext.DType.float16, ext.DType.bfloat16, ext.Sm90Config
    assert ext.sm90_workspace_size(f16, cfg.decode, 4096, 16, 4096, 132) == 0
    assert ext.sm90_workspace_size(f16, cfg.large, 4096, 8192, 4096, 132) == 0
    assert ext.sm90_workspace_size(f16, cfg.streamk, 4096, 16, 4096, 132) > 0  # partial tiles of split K
    assert ext.sm90_workspace_size(bf16, cfg.wide, 4096, 8192, 4096, 132) == 0
    assert ext.sm90_config_shape(ext.Sm90Config.decode) == (64, 32, 256)
    assert ext.sm90_config_shape(ext.Sm90Config.large) == (128, 128, 128)
    assert ext.sm90_config_shape(ext.Sm90Config.wide) == (128, 256, 128)


def test_sm90_schedules_are_accepted_and_split_k_needs_a_workspace(ext):
    if not ext.sm90_built():
        pytest.skip("built without the sm90a kernels")
    f16, cfg, raster = ext.DType.float16, ext.Sm90Config, ext.Sm90Raster
    for config in (cfg.large, cfg.wide, cfg.streamk):
        for swizzle in (1, 2, 4, 8):
            for order in (raster.heuristic, raster.along_m, raster.along_n):
                assert ext.sm90_can_implement(f16, config, 4096, 8192, 4096, P, P, P, 4096, P, 4096, 0, 132,
                                              swizzle, order, 1) == 0
    assert ext.sm90_can_implement(f16, cfg.streamk, 1024, 16, 8192, P, P, P, 8192, P, 1024, 0, 132,
                                  1, raster.heuristic, 16) == 0
    # 4096 x 256 has 256 tiles of 128 x 32, about two waves: stream-K's heuristic runs it
    # data-parallel, with no workspace. An explicit split-K reaches CUTLASS's scheduler and
    # needs its reduction buffer (sized per output tile, whatever the number of slices).
    assert ext.sm90_workspace_size(f16, cfg.streamk, 4096, 256, 4096, 132, 1, raster.heuristic, 1) == 0
    split = [ext.sm90_workspace_size(f16, cfg.streamk, 4096, 256, 4096, 132, 1, raster.heuristic, n) for n in (2, 16)]
    assert split[0] > 0 and split[0] == split[1]
    assert tuple(ext.Sm90Raster.__members__) == SM90_RASTERS


def test_the_extension_interface_version_is_this_packages(ext):
    assert ext.interface_version == _ext.INTERFACE_VERSION


def test_an_extension_built_from_other_sources_is_refused(monkeypatch):
    stale = types.ModuleType("wanda_kernels._C")
    stale.__file__ = "/somewhere/_C.so"  # no interface_version: built before it existed
    monkeypatch.setitem(sys.modules, "wanda_kernels._C", stale)
    monkeypatch.setattr(wanda_kernels, "_C", stale, raising=False)
    _ext._load.cache_clear()
    try:
        assert _ext.extension() is None
        error = _ext.extension_error()
        assert "interface version 1, this package needs" in error and "rebuild" in error and "/somewhere/_C.so" in error
    finally:
        _ext._load.cache_clear()


def test_sm90_dispatch_tiles_are_the_built_configurations(ext):
    # The dispatch (gemm24.policy) counts tiles with its own copy of the configurations
    # and their shapes: they must be the enum and the table _C was built from.
    from wanda_kernels.gemm24 import SM80_CONFIGS, SM90_CONFIGS, SM90_DISPATCH, SM90_TILES

    assert tuple(ext.Sm90Config.__members__) == SM90_CONFIGS
    assert tuple(ext.Sm80Config.__members__) == SM80_CONFIGS
    assert set(SM90_TILES) == set(SM90_CONFIGS)
    for config in SM90_CONFIGS:
        assert ext.sm90_config_shape(getattr(ext.Sm90Config, config)) == SM90_TILES[config], config
    assert {config for config, _ in SM90_DISPATCH} <= set(SM90_CONFIGS)


def test_runs_on_follows_sass_compatibility(ext):
    archs = _ext.built_archs()
    if 80 in archs:
        assert _ext.runs_on(8, 0) and _ext.runs_on(8, 6) and _ext.runs_on(8, 9)
    if 90 in archs:
        assert _ext.runs_on(9, 0)
    assert not _ext.runs_on(7, 5) and not _ext.runs_on(12, 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("config", "m", "n", "k"), [("large", 4096, 2048, 4096), ("large", 11008, 8192, 4096), ("decode", 4096, 8, 11008), ("decode", 1024, 16, 8192)])
def test_sm80_can_implement_llama_shapes(ext, dtype, config, m, n, k):
    dtype, config = getattr(ext.DType, dtype), getattr(ext.Sm80Config, config)
    assert ext.sm80_can_implement(dtype, config, m, n, k, P, P, P, k, P, n) == 0


# Both kernels' entry points check their arguments before anything else (whether or not
# the kernel is built), with messages that name the argument.
CALLS = {
    "sm80": (dict(dtype="float16", config=("Sm80Config", "large"), m=4096, n=2048, k=4096, values=P, meta=P, x=P,
                  ldb=4096, out=P, ldd=2048), "sm80_can_implement", "sm80_gemm", dict(stream=0)),
    "sm90": (dict(dtype="float16", config=("Sm90Config", "decode"), m=4096, n=16, k=4096, values=P, meta=P, x=P,
                  ldx=4096, y=P, ldy=4096, bias=0, sm_count=132), "sm90_can_implement", "sm90_gemm",
             dict(workspace=0, stream=0)),
}


def _call_args(ext, kernel, change):
    """CALLS[kernel]'s arguments with ``change``; dtype and config names become _C's enums."""
    args = {**CALLS[kernel][0], **change}
    if isinstance(args["dtype"], str):
        args["dtype"] = getattr(ext.DType, args["dtype"])
    if isinstance(args["config"], tuple):
        enum, name = args["config"]
        args["config"] = getattr(getattr(ext, enum), name)
    return args


@pytest.mark.parametrize(
    ("kernel", "change", "message"),
    [
        ("sm80", dict(m=48), r"m \(out_features\) must be a positive multiple of 32; got 48"),
        ("sm80", dict(k=96), r"k \(in_features\) must be a positive multiple of 64; got 96"),
        ("sm80", dict(n=0), r"n \(tokens\) must be positive; got 0"),
        ("sm80", dict(n=12, ldd=12), r"n \(tokens\) must be a multiple of 8; got 12"),
        ("sm80", dict(values=P + 2), r"values must be 16-byte aligned; got 0x10002"),
        ("sm80", dict(meta=0), r"meta is a null pointer"),
        ("sm80", dict(x=P + 8), r"x must be 16-byte aligned"),
        ("sm80", dict(ldb=4100), r"x row stride \(ldb\) must be >= k and a multiple of 8; got 4100"),
        ("sm80", dict(ldd=8), r"out row stride \(ldd\) must be >= n"),
        ("sm90", dict(m=100), r"m \(out_features\) must be a positive multiple of 8; got 100"),
        ("sm90", dict(k=96), r"k \(in_features\) must be a positive multiple of 64; got 96"),
        ("sm90", dict(n=0), r"n \(tokens\) must be positive; got 0"),
        ("sm90", dict(meta=P + 4), r"meta must be 16-byte aligned"),
        ("sm90", dict(y=0), r"y is a null pointer"),
        ("sm90", dict(bias=P + 2), r"bias must be 0 \(none\) or 16-byte aligned"),
        ("sm90", dict(ldx=4100), r"x row stride \(ldx\) must be >= k and a multiple of 8; got 4100"),
        ("sm90", dict(ldy=8), r"y row stride \(ldy\) must be >= m"),
        ("sm90", dict(sm_count=0), r"sm_count must be positive; got 0"),
        ("sm90", dict(swizzle=3), r"swizzle must be 1, 2, 4 or 8; got 3"),
        ("sm90", dict(splits=0), r"splits must be >= 1; got 0"),
    ],
)
def test_argument_checks_name_the_argument(ext, kernel, change, message):
    _, check, launch, launch_only = CALLS[kernel]
    args = _call_args(ext, kernel, change)
    with pytest.raises(ValueError, match=message):
        getattr(ext, check)(**args)
    with pytest.raises(ValueError, match=message):
        getattr(ext, launch)(**args, **launch_only)


@pytest.mark.parametrize(("kernel", "change"), [
    ("sm80", dict(dtype=0)), ("sm80", dict(config=1)), ("sm80", dict(config=("Sm90Config", "large"))),
    ("sm90", dict(dtype=1)), ("sm90", dict(config=3)), ("sm90", dict(config=("Sm80Config", "decode"))),
    ("sm90", dict(raster=2)),
])
def test_dtype_and_config_are_enums_not_integers(ext, kernel, change):
    # An integer, or the other kernel's configuration enum, is refused by pybind's
    # argument conversion, before any check or launch.
    _, check, launch, launch_only = CALLS[kernel]
    args = _call_args(ext, kernel, change)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        getattr(ext, check)(**args)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        getattr(ext, launch)(**args, **launch_only)


def test_status_strings(ext):
    assert ext.status_string(0) == "Success"
    assert "Misaligned" in ext.status_string(1) or "misaligned" in ext.status_string(1).lower()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_launch_without_gpu_reports_a_status(ext):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine: the launch would run for real")
    f16 = ext.DType.float16
    status = ext.sm80_gemm(f16, ext.Sm80Config.large, 4096, 2048, 4096, P, P, P, 4096, P, 2048, 0)
    assert status != 0 and ext.status_string(status)
    if ext.sm90_built():
        status = ext.sm90_gemm(f16, ext.Sm90Config.decode, 4096, 16, 4096, P, P, P, 4096, P, 4096, 0, 0, 132, 0)
        assert status != 0 and ext.status_string(status)


def test_cpu_input_reason_names_the_device():
    reason = __import__("wanda_kernels.gemm24", fromlist=["x"]).unavailable_reason(torch.empty(1))
    assert reason and "cpu" in reason


def test_missing_extension_message_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (None, f"the extension wanda_kernels._C is not built (x); {_ext.BUILD_HINT}"))
    assert "pip install ." in _ext.extension_error() and "nvcc" in _ext.extension_error()
    assert _ext.built_archs() == [] and not _ext.runs_on(8, 0)


class _Dist:
    """A stand-in for an importlib.metadata distribution of wanda-kernels."""

    def __init__(self, direct_url=None, files=()):
        self._direct_url, self.files = direct_url, list(files)

    def read_text(self, name):
        return self._direct_url if name == "direct_url.json" else None


class _File(type(Path())):
    def locate(self):
        return self


def test_importing_the_source_tree_is_named(tmp_path, monkeypatch):
    # Python started in a checkout imports its source tree, which has no _C, while the
    # installed copy has one: say so, not "not built".
    checkout = tmp_path / "checkout"
    (checkout / "wanda_kernels").mkdir(parents=True)
    (checkout / "csrc").mkdir()
    (checkout / "setup.py").write_text("")
    site = tmp_path / "site-packages" / "wanda_kernels"
    site.mkdir(parents=True)
    installed = _File(site / "_C.cpython-312-x86_64-linux-gnu.so")
    monkeypatch.setattr(_ext, "_distributions", lambda: [_Dist(files=[installed])])
    message = _ext._source_tree_message(checkout / "wanda_kernels")
    assert message == (f"the extension wanda_kernels._C is not built in the source tree at {checkout}, which is what "
                       "Python is importing (Python was started in the checkout, or it is on PYTHONPATH); the "
                       f"installed copy has it ({installed}): run from another directory, or `pip install -e .` "
                       "there to build _C in place")
    # Not installed anywhere: the same advice, without the installed copy.
    monkeypatch.setattr(_ext, "_distributions", lambda: [])
    assert "is what Python is importing" in _ext._source_tree_message(checkout / "wanda_kernels")
    assert "installed copy" not in _ext._source_tree_message(checkout / "wanda_kernels")
    # An editable install of that checkout (built without nvcc): the usual "not built" message.
    url = f'{{"url": "file://{checkout}", "dir_info": {{"editable": true}}}}'
    monkeypatch.setattr(_ext, "_distributions", lambda: [_Dist(direct_url=url)])
    assert _ext._source_tree_message(checkout / "wanda_kernels") is None
    # An installed copy (no setup.py beside the package): the usual message too.
    assert _ext._source_tree_message(site) is None


def test_the_launchers_map_every_dtype_and_configuration_to_the_enums(ext):
    # What launch_sm80 / launch_sm90 hand to _C, checked without a GPU: every dtype and
    # configuration name the policy can return has its enum, and the sm90 workspace
    # query (host-only) accepts them.
    from wanda_kernels.gemm24 import SM80_CONFIGS, SM90_CONFIGS, launch

    dtypes, sm80, sm90, rasters = launch._enums(ext)
    assert set(dtypes) == {torch.float16, torch.bfloat16} and set(sm80) == set(SM80_CONFIGS)
    assert set(sm90) == set(SM90_CONFIGS) and set(rasters) == set(SM90_RASTERS)
    if ext.sm90_built():
        sizes = {c: launch._sm90_workspace_bytes(dtypes[torch.bfloat16], sm90[c], 4096, 16, 4096, 132, 1,
                                                 rasters["heuristic"], 1)
                 for c in SM90_CONFIGS}
        assert sizes["streamk"] > 0 and sizes["decode"] == sizes["large"] == sizes["wide"] == 0
