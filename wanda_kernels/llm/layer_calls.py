"""What a model passes its decoder layers: the first layer's calibration inputs, and each layer's own arguments.

``prune_model`` runs the decoder layers one at a time, outside the model's forward, so
it must call each layer as the model's own loop would. Besides the hidden states, that
loop gives a layer arguments that depend only on the token positions, not on the hidden
states: the attention mask, position ids, rotary ``position_embeddings``... and these
differ from layer to layer in many current models: Gemma 2 and 3, gpt-oss, Cohere 2 and
OLMo 3 alternate sliding-window and full attention (each kind gets its own mask, and
Gemma 3 its own rotary base), Llama 4 alternates chunked and full attention, and hybrid
models give linear-attention layers a different mask. Calling every layer with its
first layer's arguments runs the full-attention layers with a sliding window's mask and
computes their statistics, and every later layer's inputs, from activations the model
never produces (silently: the shapes agree).

:func:`capture_layer_inputs` therefore records, with one extra forward of the first
calibration sample, the arguments the model's loop gives each layer
(:class:`LayerCall`): it replaces every decoder layer's forward with one that records
its arguments and hands its hidden states on unchanged (so no layer computes anything),
and stops the forward at the last one. A layer the loop skips on token ids alone
(Mllama's cross-attention layers, without an image) gets no call (None). The inputs of
the first layer the loop calls, for every sample, come from a forward pre-hook that
stops each forward there. :func:`run_layer` calls a layer with its own arguments.

No model-name checks: a model whose loop does not take the recording forwards' outputs
(neither a tensor nor a 1-tuple, the two forms transformers' layers return) gets every
layer called with its first layer's arguments, with a warning, as before this module
existed; unless its layers are of several kinds (Jamba's attention and Mamba layers),
which is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._warn import warn_external

__all__ = ["LayerCall", "capture_layer_inputs", "run_layer"]

# Arguments that hold a cache: the decoder layers run outside the model, once per sample,
# so no cache may carry state from one call to the next.
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "cache_params")


@dataclass(frozen=True)
class LayerCall:
    """What the model's loop passes one decoder layer besides its hidden states.

    ``args``: the positional arguments after the hidden states (RecurrentGemma passes
    its position ids and mask positionally); ``kwargs``: the keyword arguments (the
    layer's own attention mask, ``position_embeddings``, ...), without a cache. Tensors
    stay where the model made them; the same tensor is shared, not copied, by the layers
    that get it.
    """

    args: tuple
    kwargs: dict

    def to(self, device) -> LayerCall:
        """This call with its tensors (also inside tuples, lists and dicts) on ``device``."""
        return LayerCall(_to(self.args, device), _to(self.kwargs, device))


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _StopForward(Exception):
    """Raised by a hook to stop the model's forward once what was needed is recorded."""


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    """A layer call's hidden states, and the rest of its arguments without a cache."""
    if args:
        hidden, rest = args[0], tuple(None if _is_cache(a) else a for a in args[1:])
    else:
        hidden, rest = kwargs["hidden_states"], ()
    kept = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _CACHE_ARGUMENTS}
    return hidden, LayerCall(rest, kept)


def _is_cache(value) -> bool:
    # transformers' Cache classes (DynamicCache, HybridMambaAttentionDynamicCache, ...),
    # recognised without importing transformers
    return any(cls.__name__.endswith("Cache") for cls in type(value).__mro__)


def _recording_forward(index: int, last: bool, as_tuple: bool, seen: list):
    """A forward for decoder layer ``index`` during one forward of the model: records the
    call and passes the hidden states on (``(hidden,)`` when ``as_tuple``); the last
    layer's stops the model's forward."""

    def forward(*args, **kwargs):
        hidden, call = _split(args, kwargs)
        seen.append((index, hidden, call))
        if last:
            raise _StopForward
        return (hidden,) if as_tuple else hidden

    return forward


def _recorded_calls(model: nn.Module, layers: nn.ModuleList, row: torch.Tensor) -> list[LayerCall | None] | str:
    """Each layer's :class:`LayerCall` (None: the forward skipped it) from one forward of
    ``row`` (1, seqlen) with every layer's forward replaced by :func:`_recording_forward`;
    or why they could not be recorded.

    The forward is replaced on each layer itself (an attribute of the instance, removed
    afterwards), not the layer by a stand-in module: the model's loop may ask what a
    layer is (transformers 4.x's Jamba gives its Mamba layers another mask by
    ``isinstance``) or read its attributes (``attention_type``, ``is_sliding``...).
    """
    why = ""
    for as_tuple in (False, True):  # the layers' output: a tensor (most of transformers 5) or a 1-tuple
        seen: list = []
        own = [layer.__dict__.get("forward") for layer in layers]  # a forward of the instance's own (accelerate's)
        for i, layer in enumerate(layers):
            layer.forward = _recording_forward(i, i == len(layers) - 1, as_tuple, seen)
        try:
            model(row, use_cache=False)
        except _StopForward:
            pass
        except Exception as exc:  # noqa: BLE001 - the model's loop did something the recording cannot follow
            why = f"{type(exc).__name__}: {exc}"
            continue
        finally:
            for layer, forward in zip(layers, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
        indices = [i for i, _, _ in seen]
        if not indices or any(a >= b for a, b in zip(indices, indices[1:])):
            why = f"the model's forward called its decoder layers {indices[:8]}, not each at most once in order"
            continue
        shape = seen[0][1].shape
        if any(not isinstance(h, torch.Tensor) or h.shape != shape for _, h, _ in seen):
            why = "the hidden states changed shape between decoder layers"
            continue
        calls: list[LayerCall | None] = [None] * len(layers)
        for i, _, call in seen:
            calls[i] = call
        return calls
    return why


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, device=None, *,
                         warn: bool = True) -> tuple[torch.Tensor, list[LayerCall | None]]:
    """Run ``model`` on each calibration row until its first decoder layer: that layer's
    inputs, and the arguments the model passes each decoder layer.

    Args:
        model: the model whose forward calls ``layers`` in order.
        layers: its decoder layers (:func:`~wanda_kernels.llm.pipeline.find_decoder_layers`).
        calib: ``(nsamples, seqlen)`` int64 token ids, on any device (moved to the input
            embeddings' device one row at a time).
        device: where the inputs go (None: where the model made them).
        warn: warn when the layers' own arguments could not be recorded (False: on all
            ranks but the first).

    Returns:
        ``(inputs, calls)``: ``inputs`` ``(nsamples, seqlen, hidden)``, the hidden states
        the first layer the model calls gets, in their dtype on ``device``; ``calls``: one
        :class:`LayerCall` per layer, recorded from the first row (the rows share a
        length, so their masks and positions agree), or None for a layer the model's
        forward does not call on token ids alone (Mllama's cross-attention layers, which
        wait for an image).

    Raises:
        ValueError: the layers are of several kinds (Jamba's attention and Mamba layers)
            and their arguments could not be recorded: no layer's may stand for another's.
    """
    embed_device = model.get_input_embeddings().weight.device
    recorded = _recorded_calls(model, layers, calib[:1].to(embed_device)) if len(layers) > 1 else None
    kinds = {type(layer) for layer in layers}
    if isinstance(recorded, str) and len(kinds) > 1:
        raise ValueError(f"could not record the arguments {type(model).__name__} gives each of its decoder layers "
                         f"({recorded}), whose kinds differ ({', '.join(sorted(k.__name__ for k in kinds))}), so "
                         "none can be called with another's arguments: prune_model cannot run them one by one")
    first = next(i for i, call in enumerate(recorded) if call is not None) if isinstance(recorded, list) else 0
    inputs: list[torch.Tensor] = []
    seen: dict = {}

    def hook(module, args, kwargs):
        hidden, call = _split(args, kwargs)
        inputs.append(hidden.detach().to(device) if device is not None else hidden.detach())
        seen.setdefault("call", call)
        raise _StopForward

    handle = layers[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calib:
            try:
                model(row[None].to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(calib):
        raise RuntimeError(f"decoder layer {first} saw {len(inputs)} of {len(calib)} calibration inputs")
    if recorded is None:
        calls = [seen["call"]]
    elif isinstance(recorded, str):
        if warn:
            warn_external(f"could not record the arguments {type(model).__name__} gives each decoder layer "
                          f"({recorded}); every layer is called with those of the first, which is right only when "
                          "the layers' attention masks and position embeddings all agree (no sliding-window layers)")
        calls = [seen["call"]] * len(layers)
    else:
        calls = recorded
    return torch.cat(inputs, dim=0), calls


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``layer``'s outputs ``(nsamples, seqlen, hidden)`` for ``inputs`` of that shape, one sample per call.

    ``call``'s tensors must already be on ``inputs``' device (:meth:`LayerCall.to`).
    """
    out = torch.empty_like(inputs)
    for j in range(inputs.shape[0]):
        out[j : j + 1] = _layer_out(layer(inputs[j : j + 1], *call.args, **call.kwargs))
    return out
