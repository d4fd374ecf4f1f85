"""Build script: the pure-Python package plus, where nvcc exists, the CUDA extension _C.

_C (csrc/, CMakeLists.txt) wraps CUTLASS's 2:4 sparse GEMM. It is built by CMake for
the architectures in WANDA_KERNELS_CUDA_ARCHS (default "80;90") whenever a CUDA
compiler is found, and skipped, with one message, when none is or when
WANDA_KERNELS_SKIP_CUDA_BUILD=1. Without _C the package works; SparseLinear then runs
dense on the decompressed weight and says so. When a compiler is found and the build
fails, the install fails, with a message saying what to do: it never quietly installs
a package without the extension the user asked for.

A built _C is kept under $WANDA_KERNELS_CACHE/build (default ~/.cache/wanda_kernels/build),
keyed by a hash of everything it depends on (cuda_env.build_cache_key): installing again
from the same sources with the same compilers (the README's test command after its main
command) copies it instead of compiling for minutes. WANDA_KERNELS_BUILD_CACHE=0 builds
afresh.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "_build_backend"))
from cuda_env import (  # noqa: E402
    BUILD_CACHE_ENV,
    build_cache_key,
    build_jobs,
    cached_extension,
    cuda_archs,
    find_nvcc,
    run_build,
    skip_reason,
    store_extension,
)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def cutlass_include_dirs() -> list[str]:
    if os.environ.get("CUTLASS_HOME"):
        home = Path(os.environ["CUTLASS_HOME"])
        return [str(home / "include"), str(home / "tools" / "util" / "include")]
    spec = importlib.util.find_spec("cutlass_library")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("CUTLASS headers not found: `pip install nvidia-cutlass==4.2.0.0` or set CUTLASS_HOME")
    src = Path(list(spec.submodule_search_locations)[0]) / "source"
    return [str(src / "include"), str(src / "tools" / "util" / "include")]


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        archs = cuda_archs()
        nvcc = find_nvcc()
        includes = cutlass_include_dirs()
        # Built once per sources + compilers + architectures + Python: a second install
        # (the README's test command after its main command, a reinstall after a Python-only
        # change) copies the earlier build instead of compiling for minutes again.
        key = build_cache_key(archs, nvcc, includes, pybind11.__version__)
        cached = cached_extension(key, target.name)
        if cached is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cached, target)
            print(f"wanda_kernels: reusing _C built earlier from the same sources and compilers ({cached}; "
                  f"{BUILD_CACHE_ENV}=0 builds afresh)", flush=True)
            return
        build_dir.mkdir(parents=True, exist_ok=True)
        # --fresh: pip builds in a new temporary environment each time, so a cached
        # configuration would point at tools that no longer exist.
        args = [
            "cmake", "--fresh", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}",
            f"-DCUTLASS_INCLUDE_DIRS={';'.join(includes)}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DWK_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        ninja = shutil.which("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        # Each CUTLASS instantiation takes GBs of compiler memory: jobs bounded by memory.
        jobs, why = build_jobs()
        hopper = 8 if any(a.rstrip("a") == "90" for a in archs) else 0
        print(f"wanda_kernels: building _C with CUTLASS for sm_{', sm_'.join(archs)} with {jobs} parallel jobs "
              f"({why}): one sm80 unit and {hopper} Hopper units of 1-2 minutes of one core each (4.6 minutes in "
              "all on our 2-core machine); the [n/N] lines below count the steps, and the result is kept for the "
              "next install of the same sources", flush=True)
        run_build([args, ["cmake", "--build", str(build_dir), "--parallel", str(jobs)]])
        if target.is_file():
            store_extension(key, target)


reason = skip_reason()
if reason is not None:
    print(f"wanda_kernels: skipping the CUDA extension _C ({reason}); the package works without it, "
          "and SparseLinear runs dense F.linear instead of the CUTLASS 2:4 kernel", file=sys.stderr, flush=True)

setup(
    ext_modules=[] if reason else [CMakeExtension("wanda_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
