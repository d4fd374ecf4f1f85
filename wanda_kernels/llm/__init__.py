"""The whole-model layer (the ``[llm]`` extra): Hugging Face decoders, calibration text, the pipeline.

* :mod:`.pipeline`: ``prune_model``, the paper's sequential layer-by-layer pruning,
  with the methods Wanda, magnitude and :mod:`.sparsegpt`, and the mask switches of
  :mod:`.owl`, :mod:`.dsnot` and :mod:`.permute` (and RIA scores);
* :mod:`.models` and :mod:`.data`: the built-in model (SmolLM2-135M) and corpus (Jane
  Austen), or any local model folder and text file; no hub at run time;
* :mod:`.evaluate`: perplexity; :mod:`.checkpoint`: pruned and 2:4 compressed checkpoints;
* :mod:`.demo` and :mod:`.cli`: the ``wanda-kernels`` command.

Importing this package imports neither transformers nor Triton; the modules that need
transformers import it when called.
"""

from .pipeline import METHODS, PruneReport, prune_model

__all__ = ["prune_model", "PruneReport", "METHODS"]
