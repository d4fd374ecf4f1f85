"""Which modules are linear layers, and their ``(out, in)`` weight.

Two kinds: ``nn.Linear`` (weight ``(out, in)``, ``y = x W^T + b``) and transformers'
``Conv1D`` (GPT-2 and the original OpenAI GPT: weight stored ``(in, out)``, ``y = x W + b``),
recognised by its class name and its ``nf`` attribute so that transformers need not be
imported. Everything that prunes or compresses a layer works on the ``(out, in)`` view.

An ``nn.Linear`` subclass may compute something else with its weight: Llama 4's and
PhiMoE's routers return routing decisions, quantized layers dequantize first.
:func:`computes_linear` tells the layers that a sparse module can stand in for.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "computes_linear", "forward_matches", "linear_weight", "linear_features"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: weight ``(in, out)``, ``y = x @ W + b``."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass) or a ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


# Subclass instances already probed: module -> whether its forward is F.linear (the answer
# depends on the class and the module's own attributes, which pruning does not change).
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def computes_linear(module: nn.Module) -> bool:
    """Whether ``module(x)`` is ``x W^T + b`` of its weight, so a sparse module computes the same.

    True for ``nn.Linear``, ``Conv1D`` and ``nn.Linear`` subclasses that keep its
    ``forward`` (``nn.MultiheadAttention``'s ``out_proj``: whether its owner calls it is
    the caller's question). A subclass with its own ``forward`` (Falcon's ``FalconLinear``:
    ``x @ W.T + b``) is run once on a small input, without its hooks, and compared with
    ``F.linear``; one that returns anything else (a router's top-k, a quantized layer's
    output, an error) is not a linear layer. A weight on the meta device cannot be run: False.
    """
    if not is_linear_like(module):
        return False
    if is_conv1d(module) or type(module).forward is nn.Linear.forward:
        return True
    known = _PROBED.get(module)
    if known is None:
        known = _PROBED[module] = _forward_is_f_linear(module)
    return known


@torch.no_grad()
def forward_matches(module: nn.Module, like: torch.Tensor, x_shape: tuple[int, ...],
                    reference: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``type(module).forward(module, x)`` is ``reference(x)`` for a seeded random ``x``.

    ``x`` has shape ``x_shape`` and ``like``'s device and dtype (a weight of the module);
    ``reference`` gets it in fp32 and returns the fp32 result. The class's forward is
    called, not ``module(...)``: no hooks run. A weight on the meta device or of another
    dtype than fp16/bf16/fp32/fp64, a forward that fails or returns anything but a tensor
    of the reference's shape: False.
    """
    if like.is_meta or like.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(device=like.device, dtype=like.dtype)
    try:
        out = type(module).forward(module, x)
    except Exception:  # noqa: BLE001 - a forward that needs more than (x) does not compute reference(x)
        return False
    ref = reference(x.float())
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    # The same products summed in another order: within a few units of the dtype's
    # rounding of the largest output (0.02 for fp16/bf16 is ~10 of bf16's units); any
    # other computation (scaled, clamped, renormalised, transposed, swapped) is off by far more.
    tol = 2e-2 if like.element_size() == 2 else 1e-4
    return bool((out.float() - ref).abs().max() <= tol * ref.abs().max() + 1e-6)


def _forward_is_f_linear(module: nn.Linear) -> bool:
    weight, bias = module.weight, module.bias
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    return forward_matches(module, weight, (3, weight.shape[1]),
                           lambda x: F.linear(x, weight.float(), None if bias is None else bias.float()))


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
