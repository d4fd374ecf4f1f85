"""The extension build's decisions (no GPU, mostly no compiler): job count, and failing loudly.

``_build_backend/cuda_env.py`` is what ``setup.py`` and the PEP 517 backend share; it
is loaded by path, as ``setup.py`` loads it, because it must not import torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GB = 2**30


def _cuda_env():
    spec = importlib.util.spec_from_file_location("_wk_cuda_env", ROOT / "_build_backend" / "cuda_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_env = _cuda_env()


@pytest.mark.parametrize(("cores", "memory_gb", "jobs"), [
    (16, 128, 16),   # the H100 box: every core (16 x 5.5 GB fits in 128 GB)
    (16, 40, 7),     # memory-bound: 40 / 5.5
    (2, 24, 2),      # our CPU machine
    (8, 3, 1),       # tiny memory: still one job, never zero
    (64, 1000, 64),
])
def test_build_jobs_are_the_cores_bounded_by_memory(monkeypatch, cores, memory_gb, jobs):
    monkeypatch.delenv(cuda_env.JOBS_ENV, raising=False)
    got, why = cuda_env.build_jobs(cpu_count=cores, memory_bytes=memory_gb * GB)
    assert got == jobs
    assert f"{cores} cores" in why and f"{memory_gb} GB available" in why


def test_build_jobs_unknown_memory_stays_at_two(monkeypatch):
    monkeypatch.delenv(cuda_env.JOBS_ENV, raising=False)
    monkeypatch.setattr(cuda_env, "available_memory_bytes", lambda: None)
    assert cuda_env.build_jobs(cpu_count=16)[0] == 2
    assert cuda_env.build_jobs(cpu_count=1)[0] == 1


def test_build_jobs_this_machine_reads_its_memory(monkeypatch):
    monkeypatch.delenv(cuda_env.JOBS_ENV, raising=False)
    if sys.platform == "linux":
        assert cuda_env.available_memory_bytes() > 0
    jobs, _ = cuda_env.build_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def test_build_jobs_from_the_environment(monkeypatch):
    monkeypatch.setenv(cuda_env.JOBS_ENV, "3")
    assert cuda_env.build_jobs(cpu_count=16, memory_bytes=128 * GB) == (3, "WANDA_KERNELS_BUILD_JOBS=3")
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(cuda_env.JOBS_ENV, bad)
        with pytest.raises(SystemExit, match=rf"WANDA_KERNELS_BUILD_JOBS='{bad}': give a positive number"):
            cuda_env.build_jobs()


def test_a_failing_build_step_stops_the_install_with_one_message():
    with pytest.raises(SystemExit) as info:
        cuda_env.run_build([[sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(3)"]])
    message = str(info.value)
    assert "building the CUDA extension _C failed" in message and "exit status 3" in message
    assert "WANDA_KERNELS_SKIP_CUDA_BUILD=1 pip install ." in message
    with pytest.raises(SystemExit, match="building the CUDA extension _C failed.*No such file"):
        cuda_env.run_build([["/nonexistent/cmake", "--version"]])


@pytest.mark.skipif(shutil.which("cmake") is None or cuda_env.find_nvcc() is None
                    or importlib.util.find_spec("pybind11") is None,
                    reason="needs cmake, nvcc and pybind11 (the extension's build tools)")
def test_setup_py_fails_loudly_when_the_extension_cannot_build(tmp_path):
    # nvcc is found, so the extension must be built; CUTLASS_HOME points at an empty
    # folder, so CMake stops. The install must fail (exit != 0) with our message, and
    # leave no _C behind, not succeed without the extension.
    env = dict(os.environ, CUTLASS_HOME=str(tmp_path / "no-cutlass"), WANDA_KERNELS_CUDA_ARCHS="80",
               WANDA_KERNELS_BUILD_JOBS="1")
    env.pop("WANDA_KERNELS_SKIP_CUDA_BUILD", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "build_ext", "--build-temp", str(tmp_path / "tmp"),
         "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "wanda_kernels: building _C with CUTLASS for sm_80 with 1 parallel jobs" in result.stdout
    assert "CUTLASS headers not found" in result.stdout + result.stderr  # CMake's own reason
    assert "building the CUDA extension _C failed" in result.stderr
    assert "WANDA_KERNELS_SKIP_CUDA_BUILD=1 pip install ." in result.stderr
    assert not list((tmp_path / "lib").rglob("_C*"))


def _fake_checkout(tmp_path: Path) -> Path:
    (tmp_path / "csrc").mkdir(parents=True)
    (tmp_path / "csrc" / "kernel.cu").write_text("// v1")
    (tmp_path / "CMakeLists.txt").write_text("project(x)")
    (tmp_path / "setup.py").write_text("")
    return tmp_path


def test_build_cache_key_follows_everything_the_build_depends_on(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_env, "ROOT", _fake_checkout(tmp_path / "src"))
    cutlass = tmp_path / "cutlass-include"
    (cutlass / "cutlass").mkdir(parents=True)
    (cutlass / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4")
    key = lambda archs=("80", "90"), pybind="2.13.6": cuda_env.build_cache_key(  # noqa: E731
        list(archs), sys.executable, [str(cutlass)], pybind)
    first = key()
    assert key() == first  # deterministic
    # The same CUTLASS at another path (pip's build environment is new each time): same key.
    moved = tmp_path / "elsewhere"
    shutil.copytree(cutlass, moved)
    assert cuda_env.build_cache_key(["80", "90"], sys.executable, [str(moved)], "2.13.6") == first
    assert key(archs=("80",)) != first and key(pybind="2.12.0") != first
    (cutlass / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 5")
    assert key() != first
    (cutlass / "cutlass" / "version.h").write_text("#define CUTLASS_MAJOR 4")
    (tmp_path / "src" / "csrc" / "kernel.cu").write_text("// v2")
    assert key() != first
    (tmp_path / "src" / "csrc" / "kernel.cu").write_text("// v1")
    assert key() == first


def test_build_cache_stores_and_finds_a_built_extension(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cuda_env.BUILD_CACHE_ENV, raising=False)
    built = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"
    built.write_bytes(b"\x7fELF built")
    assert cuda_env.cached_extension("ab" * 32, built.name) is None
    stored = cuda_env.store_extension("ab" * 32, built)
    assert stored.read_bytes() == built.read_bytes() and stored.is_relative_to(tmp_path / "cache" / "build")
    assert cuda_env.cached_extension("ab" * 32, built.name) == stored
    assert cuda_env.cached_extension("cd" * 32, built.name) is None  # another key: built afresh
    monkeypatch.setenv(cuda_env.BUILD_CACHE_ENV, "0")
    assert cuda_env.cached_extension("ab" * 32, built.name) is None and cuda_env.store_extension("ab" * 32, built) is None


def test_build_cache_key_follows_compiler_flags_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_env, "ROOT", _fake_checkout(tmp_path / "src"))
    monkeypatch.delenv("NVCC_APPEND_FLAGS", raising=False)
    plain = cuda_env.build_cache_key(["80"], sys.executable, [], "2.13.6")
    monkeypatch.setenv("NVCC_APPEND_FLAGS", "-lineinfo")
    assert cuda_env.build_cache_key(["80"], sys.executable, [], "2.13.6") != plain
