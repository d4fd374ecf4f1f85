"""Which modules are linear layers, and their ``(out, in)`` weight.

Two kinds: ``nn.Linear`` (weight ``(out, in)``, ``y = x W^T + b``) and transformers'
``Conv1D`` (GPT-2 and the original OpenAI GPT: weight stored ``(in, out)``, ``y = x W + b``),
recognised by its class name and its ``nf`` attribute so that transformers need not be
imported. Everything that prunes or compresses a layer works on the ``(out, in)`` view.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "linear_weight", "linear_features"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: weight ``(in, out)``, ``y = x @ W + b``."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_linear_like(module: nn.Module, *, exact: bool = False) -> bool:
    """An ``nn.Linear`` (``exact``: that class itself, not a subclass) or a ``Conv1D``."""
    linear = type(module) is nn.Linear if exact else isinstance(module, nn.Linear)
    return linear or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear-like module, detached (a transposed view for Conv1D).

    A view of the parameter's storage: writing into it changes the layer.
    """
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (also on the meta device), else None."""
    if not is_linear_like(module):
        return None
    out_features, in_features = linear_weight(module).shape
    return in_features, out_features
