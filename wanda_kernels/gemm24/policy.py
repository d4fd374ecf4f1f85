"""Which 2:4 kernel runs where, and with which tile configuration.

* compute capability 9.0 (H100, H200): the CUTLASS 3.x sm90a kernels (sparse wgmma),
  reading the metadata in the sm90 layout;
* 8.x (A100, A10, L4, RTX 30/40): the CUTLASS sm80 kernel (mma.sp), sm80 layout;
* anything else, or a build without that kernel: no kernel (the caller runs dense).

Pure functions of the device, dtype and problem shape; nothing here launches anything.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .._layout24 import DTYPES_24
from .loader import extension, extension_error, runs_on, sm90_built

__all__ = [
    "select_kernel",
    "meta_format_for",
    "unavailable_reason",
    "kernel_unavailable",
    "sm80_config_for",
    "sm90_config_for",
    "sm90_schedule_for",
    "Sm90Schedule",
    "SM90_RASTERS",
    "SM80_CONFIGS",
    "SM90_CONFIGS",
    "SM90_TILES",
    "SM90_DISPATCH",
]

# The configurations of _C (its Sm80Config / Sm90Config enums, in order), and the
# sm90a tile shapes (M, N, K) of csrc/sparse24_sm90.h's sm90_tile_shape. The dispatch
# below needs them without the extension; tests/test_extension.py checks both against
# the built _C.
SM80_CONFIGS = ("decode", "large")
SM90_CONFIGS = ("decode", "large", "streamk", "wide")
SM90_TILES = {"decode": (64, 32, 256), "large": (128, 128, 128), "streamk": (128, 32, 256), "wide": (128, 256, 128)}

_SM80_DECODE_MAX_TOKENS = 128  # sm80: up to this many (padded) tokens use the small tile

# sm90a dispatch, read off benchmarks/tune_sm90.py on an H100 SXM (raw times in
# benchmarks/results/h100/round2/tune_sm90_fp16_*.json; a CPU test replays the rule on
# them). It counts each configuration's output tiles (one CTA each) against the
# multiprocessors. Up to 128 tokens the weight's bytes dominate and only the two
# small-N tiles are considered; above, the largest tile first:
#   wide    (128 x 256) once it has at least half a wave of tiles;
#   large   (128 x 128) once it has at least a quarter of a wave;
#   decode  (64 x 32) while its tiles fit in one wave;
#   streamk (128 x 32) otherwise: it splits K so that a partial wave stays busy.
# Tiles are ceil(out_features / tile M) * ceil(tokens / tile N).
SM90_DISPATCH: tuple[tuple[str, float], ...] = (
    # (configuration, least tiles as a fraction of the SM count)
    ("wide", 0.5),
    ("large", 0.25),
)
_SM90_SMALL_N_TOKENS = 128

# _C's Sm90Raster enum, in order: the order in which the persistent configurations
# (large, wide, streamk) hand output tiles to CTAs (CUTLASS's RasterOrderOptions).
SM90_RASTERS = ("heuristic", "along_m", "along_n")


class Sm90Schedule(NamedTuple):
    """How a persistent sm90a configuration walks its output tiles (csrc/sparse24_sm90.h).

    ``swizzle`` (1, 2, 4, 8): neighbouring tiles handed out together along the raster,
    so that CTAs running at once share x and W tiles in L2. ``raster``: one of
    ``SM90_RASTERS``. ``splits`` > 1 (``streamk`` only): a split-K of that many K slices
    instead of the stream-K decomposition. The defaults are CUTLASS's.
    """

    swizzle: int = 1
    raster: str = "heuristic"
    splits: int = 1


_DEFAULT_SCHEDULE = Sm90Schedule()


def sm80_config_for(tokens: int) -> str:
    """The sm80 configuration for ``tokens`` (padded) rows of input."""
    return "decode" if tokens <= _SM80_DECODE_MAX_TOKENS else "large"


@functools.lru_cache(maxsize=4096)  # called per launch; a pure function of three ints
def sm90_config_for(tokens: int, out_features: int, sm_count: int) -> str:
    """The sm90a configuration ``SparseLinear`` runs for ``tokens`` rows of input (see ``SM90_DISPATCH``)."""
    def tiles(config: str) -> int:
        tile_m, tile_n, _ = SM90_TILES[config]
        return -(-out_features // tile_m) * -(-tokens // tile_n)

    for config, least in SM90_DISPATCH:
        if tokens > _SM90_SMALL_N_TOKENS and tiles(config) >= least * sm_count:
            return config
    return "decode" if tiles("decode") <= sm_count else "streamk"


def sm90_schedule_for(config: str, tokens: int, out_features: int, in_features: int, sm_count: int) -> Sm90Schedule:
    """The tile order ``config`` runs with for a ``tokens x in_features -> out_features`` problem.

    Called per launch. CUTLASS's default everywhere until ``tune_sm90.py --schedules`` has
    run on a GPU; a rule that computes anything should be cached per shape, like
    :func:`sm90_config_for`.
    """
    return _DEFAULT_SCHEDULE


def select_kernel(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """``(kernel, None)`` with kernel ``"sm90"`` or ``"sm80"``, or ``(None, why not)``.

    The rule: compute capability 9.0 -> the sm90a kernel; 8.x -> the sm80 kernel;
    anything else (or a build without the kernel) -> no kernel: dense fallback.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"the input is on {device} (the CUTLASS 2:4 kernels run on CUDA GPUs)"
    if dtype not in DTYPES_24:
        return None, f"the input is {dtype} (the kernels take float16 or bfloat16)"
    if extension() is None:
        return None, extension_error()
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        if sm90_built():
            return "sm90", None
        return None, ("GPU compute capability 9.0 needs the sm90a (Hopper) kernels, and this build of "
                      f"wanda_kernels._C has none (built for {extension().cuda_archs}); rebuild with "
                      "WANDA_KERNELS_CUDA_ARCHS including 90 and nvcc 12.0 or later (the sm80 kernel is slower "
                      "than dense on Hopper)")
    if major == 8 and runs_on(major, minor):
        return "sm80", None
    return None, (f"GPU compute capability {major}.{minor}: the 2:4 kernels cover 8.x (sm80) and 9.0 (sm90a); "
                  f"this build has {extension().cuda_archs}")


def meta_format_for(device: torch.device, dtype: torch.dtype) -> str:
    """The metadata layout to keep on ``device``: that of the kernel that will run (sm80 when none)."""
    return "sm90" if select_kernel(device, dtype)[0] == "sm90" else "sm80"


def unavailable_reason(x: torch.Tensor, meta_format: str = "sm80") -> str | None:
    """Why no CUTLASS kernel runs input ``x`` with metadata in ``meta_format`` (None when one does)."""
    return kernel_unavailable(x.device, x.dtype, meta_format)


def kernel_unavailable(device: torch.device, dtype: torch.dtype, meta_format: str = "sm80") -> str | None:
    """Why no CUTLASS kernel runs a weight of ``dtype`` on ``device`` with metadata in ``meta_format``
    (None when one does): no kernel there at all, or one that reads the other layout."""
    kernel, reason = select_kernel(device, dtype)
    if kernel is None:
        return reason
    if kernel != meta_format:
        return (f"the metadata is in the {meta_format} layout but this GPU runs the {kernel} kernel; move the module "
                "with .to(device) (SparseLinear converts) or convert with wanda_kernels.sparse24.meta_"
                f"{meta_format}_to_{kernel}")
    return None
