"""prune_model: the paper's sequential layer-by-layer pruning of a decoder-only LLM.

1. Capture the inputs (and keyword arguments) of the first decoder layer for the
   calibration batch, with a forward pre-hook that stops the model right there.
2. For each decoder layer in order: run it on its inputs while collecting what the
   method needs (input norms for Wanda, Hessians for SparseGPT, nothing for
   magnitude), prune its linear layers, then run it again so the next layer sees the
   outputs of the pruned layer.

The decoder layers are found as the model's largest ``nn.ModuleList`` of identical
blocks that hold linear layers, and their keyword arguments (attention mask, position
ids, ``position_embeddings``...) are whatever the model passed to its first layer:
no model-name checks. Only linear layers inside decoder layers are pruned
(``nn.Linear``, and GPT-2's ``Conv1D``, whose transposed weight is pruned as a view).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .norms import ActNormCollector
from .prune import prune_
from .sparsegpt import sparsegpt_prune_

logger = logging.getLogger("wanda_kernels")

__all__ = ["prune_model", "PruneReport", "find_decoder_layers", "capture_layer_inputs"]

METHODS = ("wanda", "magnitude", "sparsegpt")


@dataclass
class LayerReport:
    index: int
    seconds: float
    sparsity: dict[str, float]  # fraction of zeros per linear, by name inside the layer


@dataclass
class PruneReport:
    method: str
    pattern: str
    sparsity: float
    nsamples: int
    seqlen: int
    layers: list[LayerReport] = field(default_factory=list)
    total_seconds: float = 0.0
    forward_seconds: float = 0.0  # calibration forwards (incl. Wanda's norm hooks)
    prune_seconds: float = 0.0  # mask selection and weight writes (and SparseGPT's solve)

    def overall_sparsity(self) -> float:
        values = [v for layer in self.layers for v in layer.sparsity.values()]
        return sum(values) / max(1, len(values))

    def to_dict(self) -> dict:
        return asdict(self)


class _StopForward(Exception):
    pass


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight (in, out), y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a linear-like module (a transposed view for Conv1D)."""
    return module.weight.data.t() if _is_conv1d(module) else module.weight.data


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ModuleList of same-type blocks that contain linear layers."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(b) for b in mod}) == 1 \
                and linear_layers(mod[0]) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers holding linear layers; "
                         "prune_model works on decoder-only models such as LLaMA, Mistral, Qwen2, OPT, GPT-2")
    return best


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layer: nn.Module, calib: torch.Tensor, device=None):
    """Run ``model`` on each calibration row until ``layer``: its inputs and keyword arguments.

    Returns ``(inputs (nsamples, seqlen, hidden) in the layer's dtype on `device`, kwargs)``.
    """
    inputs, kwargs_seen = [], {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach().to(device) if device is not None else hidden.detach())
        if not kwargs_seen:
            kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        embed_device = model.get_input_embeddings().weight.device
        for row in calib:
            try:
                model(row[None].to(embed_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(inputs) != len(calib):
        raise RuntimeError(f"the decoder layer saw {len(inputs)} of {len(calib)} calibration inputs")
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return torch.cat(inputs, dim=0), kwargs_seen


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def prune_model(
    model: nn.Module,
    calib: torch.Tensor,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    method: str = "wanda",
    scope: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    backend: str = "auto",
) -> PruneReport:
    """Prune every linear layer inside the decoder layers of ``model``, in place.

    Args:
        model: a Hugging Face decoder-only model (or any model whose decoder layers form an
            ``nn.ModuleList`` and whose forward takes ``input_ids``), in eval mode.
        calib: ``(nsamples, seqlen)`` int64 token ids (see :func:`wanda_kernels.data.sample_windows`).
        sparsity: fraction per output row (unstructured), default 0.5; with ``pattern="N:M"``
            leave it unset (it is ``1 - N/M``) or pass exactly that.
        pattern: ``"unstructured"`` or ``"N:M"``.
        method: ``"wanda"``, ``"magnitude"`` or ``"sparsegpt"``.
        scope: magnitude only: ``"layer"`` (default, one threshold per matrix, the paper's
            baseline) or ``"row"``.
        nsamples, seqlen: use only the first ``nsamples`` rows / ``seqlen`` columns of ``calib``.
        device: the working device. With the model on CPU and ``device="cuda"``, only the
            decoder layer being pruned is moved to the GPU (and back), with the calibration
            activations, so models larger than the GPU can be pruned. Default: each layer's
            own device (also for models spread by accelerate's ``device_map``).
        progress: show a tqdm bar over the layers.

    Returns:
        A :class:`PruneReport` with the sparsity reached per linear and the time per layer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ValueError(f"calib must be an int64 tensor (nsamples, seqlen); got "
                         f"{getattr(calib, 'dtype', type(calib).__name__)} {tuple(getattr(calib, 'shape', ()))}")
    calib = calib[: nsamples or calib.shape[0], : seqlen or calib.shape[1]]
    if method != "magnitude" and scope not in (None, "row"):
        raise ValueError(f"scope={scope!r} applies to method='magnitude' only")
    if method == "magnitude" and scope is None:
        scope = "layer" if pattern == "unstructured" else "row"
    from ._validation import check_sparsity, parse_pattern

    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    device = torch.device(device) if device is not None else None

    t_start = time.perf_counter()
    _, layers = find_decoder_layers(model)
    report = PruneReport(method=method, pattern=pattern, sparsity=sparsity, nsamples=calib.shape[0],
                         seqlen=calib.shape[1])
    inps = kwargs = None
    if method != "magnitude":  # magnitude needs no activations
        t0 = time.perf_counter()
        inps, kwargs = capture_layer_inputs(model, layers[0], calib, device)
        report.forward_seconds += time.perf_counter() - t0

    bar = _progress(layers, progress, f"{method} {pattern}")
    for index, layer in enumerate(bar):
        t_layer = time.perf_counter()
        home = _first_device(layer)
        work = device or home
        if work != home:
            layer.to(work)
        linears = linear_layers(layer)
        if method == "magnitude":
            t0 = time.perf_counter()
            for mod in linears.values():
                prune_(_linear_weight(mod), None, sparsity, pattern=pattern, metric="magnitude", scope=scope,
                       backend=backend)
            report.prune_seconds += time.perf_counter() - t0
        else:
            inps, kw = inps.to(work), _to(kwargs, work)
            t0 = time.perf_counter()
            stats = _calibrate(layer, linears, inps, kw, method, backend)
            report.forward_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            for name, mod in linears.items():
                if method == "wanda":
                    prune_(_linear_weight(mod), stats[name], sparsity, pattern=pattern, backend=backend)
                else:
                    sparsegpt_prune_(_linear_weight(mod), stats[name], sparsity, nm=nm)
            report.prune_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            inps = _run_layer(layer, inps, kw)  # the next layer sees the pruned layer's outputs
            report.forward_seconds += time.perf_counter() - t0
        report.layers.append(LayerReport(index=index, seconds=time.perf_counter() - t_layer, sparsity={
            name: float((_linear_weight(mod) == 0).float().mean()) for name, mod in linears.items()}))
        if work != home:
            layer.to(home)  # the activations stay on the working device for the next layer
    report.total_seconds = time.perf_counter() - t_start
    logger.info("pruned %d decoder layers (%s, %s) in %.1f s; mean sparsity %.4f", len(layers), method, pattern,
                report.total_seconds, report.overall_sparsity())
    return report


@torch.no_grad()
def _run_layer(layer, inps, kwargs):
    out = torch.empty_like(inps)
    for j in range(inps.shape[0]):
        out[j : j + 1] = _layer_out(layer(inps[j : j + 1], **kwargs))
    return out


@torch.no_grad()
def _calibrate(layer, linears, inps, kwargs, method, backend):
    """Run the layer on its inputs; Wanda: ``{name: ||X_j||_2}``; SparseGPT: ``{name: X^T X}``."""
    if method == "wanda":
        types = tuple({type(m) for m in linears.values()})
        names = set(linears)
        with ActNormCollector(layer, include=lambda n, m: n in names, module_types=types, backend=backend) as col:
            _run_layer(layer, inps, kwargs)
        norms = col.norms()
        missing = names - set(norms)
        if missing:
            raise RuntimeError(f"linear layers {sorted(missing)} saw no input during calibration")
        return norms
    hessians, handles = {}, []
    for name, mod in linears.items():
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = hessians.get(name)
            hessians[name] = x.t() @ x if h is None else h.addmm_(x.t(), x)
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        _run_layer(layer, inps, kwargs)
    finally:
        for h in handles:
            h.remove()
    return hessians


def _progress(items, enabled, desc):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="layer", leave=False)
