"""Shared by setup.py and the build backend: is there a CUDA compiler to build _C with, how many jobs, running it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path


def _load_env_module():
    """wanda_kernels/_env.py, loaded by path: importing the package would need torch."""
    path = Path(__file__).resolve().parent.parent / "wanda_kernels" / "_env.py"
    spec = importlib.util.spec_from_file_location("_wanda_kernels_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_env = _load_env_module()
env_flag, cache_root = _env.env_flag, _env.cache_root

SKIP_ENV = "WANDA_KERNELS_SKIP_CUDA_BUILD"
ARCHS_ENV = "WANDA_KERNELS_CUDA_ARCHS"
JOBS_ENV = "WANDA_KERNELS_BUILD_JOBS"
BUILD_CACHE_ENV = "WANDA_KERNELS_BUILD_CACHE"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "80;90"
# Peak compiler memory of one Hopper (sm90a) unit, measured at ~5.3 GB with nvcc 13.0,
# plus a margin: the parallel build must never run the machine out of memory.
GB_PER_JOB = 5.5


def find_nvcc() -> str | None:
    """$CUDACXX, then $CUDA_HOME/bin/nvcc (or $CUDA_PATH), then nvcc on PATH."""
    if os.environ.get("CUDACXX") and Path(os.environ["CUDACXX"]).is_file():
        return os.environ["CUDACXX"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            nvcc = Path(os.environ[var]) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc)
    return shutil.which("nvcc")


def skip_reason() -> str | None:
    """Why the CUDA extension is not built, or None when it is."""
    if env_flag(SKIP_ENV):
        return f"{SKIP_ENV}=1 is set"
    if find_nvcc() is None:
        return "no CUDA compiler (nvcc) found on PATH, in $CUDA_HOME or $CUDACXX"
    return None


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get(ARCHS_ENV, DEFAULT_ARCHS).replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not a.rstrip("a").isdigit() or int(a.rstrip("a")) < 80]
    if not archs or bad:
        raise SystemExit(
            f"{ARCHS_ENV}={os.environ.get(ARCHS_ENV)!r}: give compute capabilities of 80 or more, e.g. '80;90' "
            "(2:4 sparse tensor cores need Ampere or later; 'native' is refused: it can silently build sm_75)"
        )
    return archs


def available_memory_bytes() -> int | None:
    """Memory the build may use: MemAvailable on Linux, free physical pages elsewhere; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def build_jobs(cpu_count: int | None = None, memory_bytes: int | None = None) -> tuple[int, str]:
    """``(jobs, why)``: parallel compile jobs for _C, and a few words saying how they were chosen.

    ``$WANDA_KERNELS_BUILD_JOBS`` when set (a positive integer, else SystemExit naming
    it); otherwise one job per core, but no more than the available memory holds at
    ``GB_PER_JOB`` each (at least one). ``cpu_count`` and ``memory_bytes`` default to
    this machine's.
    """
    value = os.environ.get(JOBS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"{JOBS_ENV}={value!r}: give a positive number of parallel compile jobs, e.g. 2")
        return int(value), f"{JOBS_ENV}={value}"
    cores = cpu_count or os.cpu_count() or 1
    memory = available_memory_bytes() if memory_bytes is None else memory_bytes
    if memory is None:
        return min(cores, 2), f"{cores} cores, available memory unknown: at most 2"
    by_memory = max(1, int(memory / (GB_PER_JOB * 2**30)))
    return min(cores, by_memory), f"{cores} cores, {memory / 2**30:.0f} GB available at {GB_PER_JOB} GB a job"


def run_build(commands: list[list[str]]) -> None:
    """Run the CMake commands in order; on any failure, stop the install with one clear message."""
    for command in commands:
        try:
            subprocess.check_call(command)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(
                f"wanda_kernels: building the CUDA extension _C failed: {exc}.\n"
                "  The compiler's or CMake's messages are above (`pip install -v .` shows them all).\n"
                "  To install without the extension (SparseLinear then runs dense F.linear): "
                f"{SKIP_ENV}=1 pip install ."
            ) from exc


# -- the build cache: _C is built once per (sources, compilers, architectures, Python) --------------


def _tool_version(tool: str | None) -> str:
    if not tool:
        return "none"
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_FLAG_ENVS = ("CUDAFLAGS", "CXXFLAGS", "CFLAGS", "LDFLAGS", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN")


def build_cache_key(archs: list[str], nvcc: str, include_dirs: list[str], pybind11_version: str) -> str:
    """sha256 of everything the built ``_C`` depends on.

    The sources (``csrc/``, ``CMakeLists.txt``, ``setup.py``, this file), the nvcc and
    host compiler versions, the architectures, the Python ABI, pybind11's version, the
    compiler flags set in the environment and CUTLASS's ``version.h`` (not the include
    paths: pip's isolated build environment lives in a new temporary folder each time).
    """
    digest = hashlib.sha256()

    def add(label: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    for path in [*sources, ROOT / "CMakeLists.txt", ROOT / "setup.py"]:
        add(path.relative_to(ROOT).as_posix(), path.read_bytes())
    add("cuda_env.py", Path(__file__).read_bytes())
    add("nvcc", _tool_version(nvcc))
    add("cxx", _tool_version(os.environ.get("CXX") or shutil.which("c++")))
    add("archs", ";".join(archs))
    add("python", f"{sys.version} {sysconfig.get_config_var('EXT_SUFFIX')}")
    add("pybind11", pybind11_version)
    for var in _FLAG_ENVS:  # flags CMake and nvcc read from the environment
        add(var, os.environ.get(var, ""))
    for include in include_dirs:
        version = Path(include) / "cutlass" / "version.h"
        add("cutlass", version.read_bytes() if version.is_file() else b"none")
    return digest.hexdigest()


def build_cache_dir() -> Path | None:
    """Where built extensions are kept: ``$WANDA_KERNELS_CACHE/build`` (default
    ``~/.cache/wanda_kernels/build``); None when ``WANDA_KERNELS_BUILD_CACHE=0``."""
    return cache_root() / "build" if env_flag(BUILD_CACHE_ENV, default=True) else None


def cached_extension(key: str, filename: str) -> Path | None:
    """The ``_C`` built earlier with the same key, or None."""
    folder = build_cache_dir()
    if folder is None:
        return None
    path = folder / key[:32] / filename
    return path if path.is_file() else None


def store_extension(key: str, built: Path) -> Path | None:
    """Keep a copy of a freshly built ``_C`` under its key (atomically); None when the cache is off or unwritable."""
    folder = build_cache_dir()
    if folder is None:
        return None
    target = folder / key[:32] / built.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{built.name}.{uuid.uuid4().hex[:8]}")
        shutil.copy2(built, tmp)
        os.replace(tmp, target)
    except OSError:
        return None
    return target
