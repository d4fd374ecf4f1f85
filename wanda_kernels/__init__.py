"""wanda_kernels: GPU kernels for pruning LLMs with Wanda (Sun et al., 2023).

``import wanda_kernels`` needs only torch: Triton is imported the first time a
Triton backend runs, and nothing here touches a GPU at import time.
"""

from __future__ import annotations

import logging

from . import reference
from .norms import ActNormCollector, accumulate_sq_norms_
from .pipeline import PruneReport, prune_model
from .prune import prune_, prune_mask
from .sparse24 import compress_24, decompress_24, meta_sm80_to_sm90, meta_sm90_to_sm80, prune_compress_24
from .sparse_linear import SparseLinear, sparsify_

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
    "SparseLinear",
    "sparsify_",
    "prune_model",
    "PruneReport",
    "reference",
    "__version__",
]

logging.getLogger("wanda_kernels").addHandler(logging.NullHandler())
