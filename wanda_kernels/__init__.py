"""wanda_kernels: GPU kernels for pruning LLMs with Wanda (Sun et al., 2023).

``import wanda_kernels`` needs only torch: Triton is imported the first time a
Triton backend runs, the extension ``_C`` the first time a 2:4 GEMM runs, and nothing
here touches a GPU at import time. ARCHITECTURE.md maps the modules.
``wanda_kernels.reference`` (plain-torch twins, the tests' oracle) is imported only by
whoever asks for it: ``from wanda_kernels import reference``.
"""

from __future__ import annotations

import logging

from .bitmap import compress_bitmap, decompress_bitmap
from .bitmap_linear import BitmapLinear
from .llm.pipeline import PruneReport, prune_model
from .norms import ActNormCollector, accumulate_sq_norms_
from .prune import prune_, prune_mask
from .sparse24 import (
    compress_24,
    decompress_24,
    meta_sm80_to_sm90,
    meta_sm90_to_sm80,
    padded_shape,
    prune_compress_24,
)
from .sparse_linear import SparseLinear
from .sparsify import sparsify_

__version__ = "0.1.0"

__all__ = [
    "prune_",
    "prune_mask",
    "accumulate_sq_norms_",
    "ActNormCollector",
    "compress_24",
    "decompress_24",
    "prune_compress_24",
    "meta_sm80_to_sm90",
    "meta_sm90_to_sm80",
    "padded_shape",
    "SparseLinear",
    "compress_bitmap",
    "decompress_bitmap",
    "BitmapLinear",
    "sparsify_",
    "prune_model",
    "PruneReport",
    "__version__",
]

logging.getLogger("wanda_kernels").addHandler(logging.NullHandler())
