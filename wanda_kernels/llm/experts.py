"""Fused mixture-of-experts weights, seen as one pair of linear layers per expert while pruning.

transformers keeps the experts of a mixture-of-experts block in one module with 3-D
parameters (the contract of its ``use_experts_implementation``: Mixtral, Qwen3-MoE,
DeepSeek, gpt-oss, OLMoE, ...): ``gate_up_proj`` (``up_proj`` when ``has_gate`` is False)
and ``down_proj``, ``(experts, out, in)`` each, ``(experts, in, out)`` when
``is_transposed``, with ``gate_up_proj_bias``/``up_proj_bias``/``down_proj_bias``
``(experts, out)`` when ``has_bias``. The module is called as ``experts(hidden_states
(tokens, hidden), top_k_index (tokens, k), top_k_weights)``. These weights are most of
such a model, and they are no ``nn.Linear``.

Wanda compares each output row of an expert with the norms of the inputs *that expert*
received. While :func:`expert_linears` is active, each such module of a decoder layer
holds one child per expert, ``<experts>.<e>``, with an ``nn.Linear`` per projection
(``gate_up_proj`` or ``up_proj``, and ``down_proj``) whose weight is a view of the
expert's slice: pruning it prunes the model. With :meth:`ExpertLinears.replay` on, a
forward hook runs them after each call of the module on the tokens routed to each expert
(its up projection, the module's own gate or activation, its down projection), once per
expert and call (with no rows for an expert that got no token), so that the pipeline's
statistics hooks (input norms, ``X^T X``) see each expert's own inputs. The module's
output is its own: the hook only reads. No names of models are involved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["is_fused_experts", "expert_linears", "ExpertLinears"]


def _up_name(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """A module of transformers' fused-experts contract (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``)."""
    if not isinstance(getattr(module, "is_transposed", None), bool) or not isinstance(getattr(module, "has_gate", None),
                                                                                       bool):
        return False
    up, down = getattr(module, _up_name(module), None), getattr(module, "down_proj", None)
    return (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3
            and up.shape[0] == down.shape[0] and up.is_floating_point() and down.is_floating_point())


def _view_linear(weight: torch.Tensor, expert: int, transposed: bool, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose weight (and bias) are views of ``weight[expert]`` (``bias[expert]``)."""
    w = weight.data[expert]
    w = w.t() if transposed else w  # (out, in) either way; a strided view of the stored (in, out) slice
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")  # no allocation
    linear.weight = nn.Parameter(w, requires_grad=False)  # shares the storage: writes reach the model
    if bias is not None:
        linear.bias = nn.Parameter(bias.data[expert], requires_grad=False)
    return linear


class ExpertLinears:
    """The per-expert linear layers attached by :func:`expert_linears`.

    Attributes:
        names: the per-expert linear layers' names in the block
            (``"mlp.experts.3.gate_up_proj"``), in order.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._replaying = False

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """While active, each call of a fused-experts module also runs its per-expert linears."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def hook(self, units: list[nn.Module]):
        def run(module, args, kwargs, output):
            if not self._replaying:
                return None
            # (hidden_states, top_k_index, top_k_weights), by position or by any keyword names
            hidden, index = [*args, *kwargs.values()][:2]
            _run_experts(module, units, hidden, index)
            return None

        return run


@torch.no_grad()
def _run_experts(module: nn.Module, units: list[nn.Module], hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
    """Each expert's up and down projection on the tokens routed to it (one read-back per call)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    # Token-expert pairs sorted by expert (ids >= len(units), expert-parallel sentinels, last).
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(units))[: len(units)].tolist()
    start = 0
    for unit, count in zip(units, counts):
        rows = x.index_select(0, order[start : start + count] // k)
        start += count
        up = getattr(unit, _up_name(module))(rows)
        inner = module._apply_gate(up) if module.has_gate else module.act_fn(up)
        unit.down_proj(inner)


@contextlib.contextmanager
def expert_linears(block: nn.Module) -> Iterator[ExpertLinears]:
    """Attach per-expert ``nn.Linear`` views to every fused-experts module inside ``block``, for the duration.

    ``block``'s parameters must stay where they are meanwhile (``block.to(...)`` would
    give the views storage of their own): move it before entering.
    """
    found = ExpertLinears()
    attached: list[tuple[nn.Module, list[str]]] = []
    handles = []
    try:
        for name, module in list(block.named_modules()):
            if not is_fused_experts(module):
                continue
            up_name, transposed = _up_name(module), module.is_transposed
            up, down = getattr(module, up_name), module.down_proj
            has_bias = getattr(module, "has_bias", False)
            up_bias = getattr(module, f"{up_name}_bias", None) if has_bias else None
            down_bias = getattr(module, "down_proj_bias", None) if has_bias else None
            units, children = [], []
            for expert in range(up.shape[0]):
                unit = nn.Module()
                unit.add_module(up_name, _view_linear(up, expert, transposed, up_bias))
                unit.add_module("down_proj", _view_linear(down, expert, transposed, down_bias))
                module.add_module(str(expert), unit)
                children.append(str(expert))
                units.append(unit)
                prefix = f"{name}.{expert}" if name else str(expert)
                found.names += [f"{prefix}.{up_name}", f"{prefix}.down_proj"]
            attached.append((module, children))
            handles.append(module.register_forward_hook(found.hook(units), with_kwargs=True))
        yield found
    finally:
        for handle in handles:
            handle.remove()
        for module, children in attached:
            for child in children:
                delattr(module, child)
