"""Fused mixture-of-experts weights, seen as one pair of linear layers per expert while pruning.

transformers keeps the experts of a mixture-of-experts block in one module with 3-D
parameters, in one of two layouts; these weights are most of such a model, and they are
no ``nn.Linear``:

- *routed by index*: the contract of transformers' ``use_experts_implementation``
  (Mixtral, Qwen3-MoE, DeepSeek, gpt-oss, OLMoE, ...): ``gate_up_proj`` (``up_proj``
  when ``has_gate`` is False) and ``down_proj``, ``(experts, out, in)`` each,
  ``(experts, in, out)`` when ``is_transposed``, with ``gate_up_proj_bias``/
  ``up_proj_bias``/``down_proj_bias`` ``(experts, out)`` when ``has_bias``; called as
  ``experts(hidden_states (tokens, hidden), top_k_index (tokens, k), top_k_weights)``.
- *stacked*: one tensor ``(experts * tokens, hidden)``, expert ``e``'s inputs in rows
  ``e * tokens ... (e + 1) * tokens``, each token already multiplied by its router score
  (so the rows of the tokens not routed to ``e`` are zero); ``gate_up_proj``
  ``(experts, hidden, 2 * inner)``, gate columns first, ``down_proj``
  ``(experts, inner, hidden)``, ``act_fn``; ``experts(x)`` is
  ``(act_fn(x_e W_gate) * x_e W_up) W_down`` per expert (Llama 4). A module is taken as
  stacked only if its shapes say so and one call of its own ``forward`` on a small input
  gives exactly that (the answer is kept per module): a look-alike that computes
  anything else stays dense, and ``prune_model``'s coverage warning says so.

Wanda compares each output row of an expert with the norms of the inputs *that expert*
received. While :func:`expert_linears` is active, each such module of a decoder layer
holds one child per expert, ``<experts>.<e>``, with an ``nn.Linear`` per projection
(``gate_up_proj`` or ``up_proj``, and ``down_proj``) whose weight is a view of the
expert's slice: pruning it prunes the model. With :meth:`ExpertLinears.replay` on, a
forward hook runs them after each call of the module on each expert's tokens (the
routed ones; in the stacked layout, its rows that are not zero, as the model scaled
them), up projection, the module's own gate or activation, down projection, once per
expert and call (with no rows for an expert that got no token), so that the pipeline's
statistics hooks (input norms, ``X^T X``) see each expert's own inputs. The module's
output is its own: the hook only reads. No names of models are involved.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .._linear_like import forward_matches

__all__ = ["is_fused_experts", "expert_linears", "ExpertLinears"]


@dataclass(frozen=True)
class _Layout:
    """How one fused-experts module stores its experts and hands them their tokens."""

    up_name: str  # "gate_up_proj", or "up_proj" (no gate)
    transposed: bool  # weights stored (experts, in, out)
    stacked: bool  # called with (experts * tokens, hidden), else with (hidden_states, top_k_index, ...)
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def inner(self, module: nn.Module, up: torch.Tensor) -> torch.Tensor:
        """The down projection's input from the up projection's output."""
        if self.stacked:
            gate, up = up.chunk(2, dim=-1)
            return module.act_fn(gate) * up
        return module._apply_gate(up) if module.has_gate else module.act_fn(up)


def _is_weight(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point()


def _indexed_layout(module: nn.Module) -> _Layout | None:
    """transformers' ``use_experts_implementation`` contract, read from the module's flags."""
    if not isinstance(getattr(module, "is_transposed", None), bool) or not isinstance(getattr(module, "has_gate", None),
                                                                                       bool):
        return None
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if not (_is_weight(up) and _is_weight(down) and up.shape[0] == down.shape[0]):
        return None
    has_bias = getattr(module, "has_bias", False)
    return _Layout(up_name, module.is_transposed, stacked=False,
                   up_bias=getattr(module, f"{up_name}_bias", None) if has_bias else None,
                   down_bias=getattr(module, "down_proj_bias", None) if has_bias else None)


# Modules already probed for the stacked layout: module -> whether their forward computes it
# (the answer depends on the class and the module's own attributes, which pruning does not change).
_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STACKED_LAYOUT = _Layout("gate_up_proj", transposed=True, stacked=True)


def _stacked_layout(module: nn.Module) -> _Layout | None:
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (_is_weight(up) and _is_weight(down) and callable(getattr(module, "act_fn", None))):
        return None
    experts, hidden, inner2 = up.shape
    if down.shape != (experts, inner2 // 2, hidden) or inner2 % 2 or up.dtype != down.dtype:
        return None
    known = _STACKED.get(module)
    if known is None:
        known = _STACKED[module] = _forward_is_stacked(module)
    return _STACKED_LAYOUT if known else None


def _forward_is_stacked(module: nn.Module) -> bool:
    """Whether the module's own forward, on two random rows per expert, is the stacked layout's computation."""
    up, down = module.gate_up_proj, module.down_proj

    def reference(x: torch.Tensor) -> torch.Tensor:
        ref = x.new_empty(x.shape[0], down.shape[2])
        for e, rows in enumerate(x.split(2)):  # one expert's slice in fp32 at a time, not a copy of all
            gate, lin = (rows @ up[e].float()).chunk(2, dim=-1)
            ref[2 * e : 2 * e + 2] = (module.act_fn(gate) * lin) @ down[e].float()
        return ref

    return forward_matches(module, up, (up.shape[0] * 2, up.shape[1]), reference)


def _layout(module: nn.Module) -> _Layout | None:
    return _indexed_layout(module) or _stacked_layout(module)


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts in 3-D weights, in either layout of the module docstring."""
    return _layout(module) is not None


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

    def hook(self, layout: _Layout, units: list[nn.Module]) -> Callable:
        def run(module, args, kwargs, output):
            if not self._replaying:
                return None
            # (hidden_states, top_k_index, top_k_weights) or (stacked,), by position or by any keyword names
            inputs = [*args, *kwargs.values()]
            split = _stacked_rows(inputs[0], len(units)) if layout.stacked else _routed_rows(*inputs[:2], len(units))
            with torch.no_grad():
                for unit, rows in zip(units, split):
                    up = getattr(unit, layout.up_name)(rows)
                    unit.down_proj(layout.inner(module, up))
            return None

        return run


def _routed_rows(hidden: torch.Tensor, top_k_index: torch.Tensor, experts: int) -> Iterator[torch.Tensor]:
    """Each expert's routed tokens ``(count, hidden)``, from the token-expert pairs (one read-back)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    # Token-expert pairs sorted by expert (ids >= experts, expert-parallel sentinels, last).
    order = torch.argsort(flat, stable=True)
    start = 0
    for count in torch.bincount(flat, minlength=experts)[:experts].tolist():
        yield x.index_select(0, order[start : start + count] // k)
        start += count


def _stacked_rows(stacked: torch.Tensor, experts: int) -> Iterator[torch.Tensor]:
    """Each expert's block of rows without its zero rows (tokens not routed there; one read-back)."""
    x = stacked.reshape(-1, stacked.shape[-1])
    kept = x.ne(0).any(dim=-1).reshape(experts, -1)  # (experts, tokens)
    rows = kept.reshape(-1).nonzero().squeeze(1)  # ascending: expert by expert
    start = 0
    for count in kept.sum(dim=1).tolist():
        yield x.index_select(0, rows[start : start + count])
        start += count


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
            layout = _layout(module)
            if layout is None:
                continue
            up, down = getattr(module, layout.up_name), module.down_proj
            units, children = [], []
            for expert in range(up.shape[0]):
                unit = nn.Module()
                unit.add_module(layout.up_name, _view_linear(up, expert, layout.transposed, layout.up_bias))
                unit.add_module("down_proj", _view_linear(down, expert, layout.transposed, layout.down_bias))
                module.add_module(str(expert), unit)
                children.append(str(expert))
                units.append(unit)
                prefix = f"{name}.{expert}" if name else str(expert)
                found.names += [f"{prefix}.{layout.up_name}", f"{prefix}.down_proj"]
            attached.append((module, children))
            handles.append(module.register_forward_hook(found.hook(layout, units), with_kwargs=True))
        yield found
    finally:
        for handle in handles:
            handle.remove()
        for module, children in attached:
            for child in children:
                delattr(module, child)
