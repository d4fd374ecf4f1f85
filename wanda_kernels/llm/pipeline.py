"""prune_model: the paper's sequential layer-by-layer pruning of a decoder-only LLM.

1. Capture the inputs of the first decoder layer for the calibration batch, with a
   forward pre-hook that stops the model right there, and the arguments the model's
   loop gives each decoder layer (:mod:`.layer_calls`).
2. For each decoder layer in order: run it on its inputs while collecting what the
   method needs (input norms for Wanda, Hessians for SparseGPT, nothing for
   magnitude), prune its linear layers, then run it again so the next layer sees the
   outputs of the pruned layer.

The decoder layers are found as the largest ``nn.ModuleList`` of blocks (of one kind
before lists that mix kinds, such as Jamba's) that hold linear layers in the innermost
module around the token embeddings (a vision-language model's language model, not its
vision encoder), not inside another list's blocks (:func:`find_decoder_layers`); a layer
the model's forward skips on token ids alone (Mllama's cross-attention layers) is left
dense; and each is called with the arguments
(attention mask, position ids, ``position_embeddings``...) the model passed it: no
model-name checks. Only linear layers inside decoder layers are pruned
(``nn.Linear`` and its subclasses that compute the same, such as Falcon's, not routers;
and GPT-2's ``Conv1D``, whose transposed weight is pruned as a view), and the experts of
mixture-of-experts blocks that transformers stores fused in 3-D parameters, each
expert's projections on the tokens routed to it (:mod:`.experts`).

Each method is one entry of :data:`METHODS`: what it collects while a layer runs, how
the collected statistics of all calibration samples are combined, and how it prunes one
linear with them. Every option and every linear's shape is checked before the first
weight changes, and so is that every weight is finite (one read-back per model).

Under ``torch.distributed`` (``torchrun``), each rank runs its share of the calibration
samples through every layer; the statistics are combined so that the masks and weights
are bit-identical to a one-process run; the linears are dealt to the ranks, each prunes
its own and broadcasts them (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .._linear_like import computes_linear, linear_weight
from .._progress import progress_bar
from .._validation import check_choice, check_positive_int
from ..norms import ActNormCollector
from ..prune import PruneSpec, apply_mask_, check_prunable, prune_spec
from . import owl as owl_alloc
from .distributed import Shard, current_shard
from .dsnot import dsnot_refine
from .experts import ExpertLinears, expert_linears
from .layer_calls import LayerCall, capture_layer_inputs, run_layer
from .permute import FOLDS, fold_, head_permutation, nm_permutation, score_matrix
from .sparsegpt import collect_hessians, sparsegpt_prune_

logger = logging.getLogger("wanda_kernels")

__all__ = ["prune_model", "check_options", "PruneReport", "find_decoder_layers", "prunable_weights",
           "capture_layer_inputs", "METHODS"]


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
    forward_seconds: float = 0.0  # calibration forwards (incl. Wanda's norm hooks; magnitude's 16-token probe)
    prune_seconds: float = 0.0  # mask selection and weight writes (and SparseGPT's solve)
    world_size: int = 1  # processes that shared the calibration (torch.distributed ranks)
    calib_tokens_per_rank: list[int] = field(default_factory=list)  # calibration tokens each rank ran
    comm_seconds: float = 0.0  # combining statistics and broadcasting weights, incl. waits for other ranks
    options: dict = field(default_factory=dict)  # metric, owl (lambda, m), permute, dsnot as used
    layer_targets: list[float] = field(default_factory=list)  # OWL: each decoder layer's sparsity
    owl_seconds: float = 0.0  # OWL's calibration pass over the dense layers
    # permute=True: {linear's name in the model: (in,) int64}, the input order in which its
    # N:M groups hold, for the layers whose permutation could not be folded into the model
    # (SparseLinear gathers its input in that order). Not in to_dict: a checkpoint stores them.
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)  # linears whose input permutation was folded into producers
    # fused MoE experts' linears (``"model.layers.0.mlp.experts.3.down_proj"``) that no calibration
    # token reached: there was nothing to rank them by, so they were pruned by weight magnitude
    uncalibrated: list[str] = field(default_factory=list)
    # linears (``"backbone.layers.0.mixer.dt_proj"``) that their decoder layer's forward never
    # called on the calibration samples (the model reads their weight itself, as Mamba's
    # dt_proj): no input to rank by and no sparse module could stand in, so left dense
    uncalled: list[str] = field(default_factory=list)
    # decoder layers the model's forward does not call on token ids alone (Mllama's
    # cross-attention layers): left dense, as they are
    skipped_layers: list[int] = field(default_factory=list)
    pruned_weight_fraction: float = 1.0  # of the decoder layers' weights (>= 2-D parameters), those pruned
    expert_linears: int = 0  # of the pruned linears, those that are one expert's projection in fused MoE weights

    def overall_sparsity(self) -> float:
        values = [v for layer in self.layers for v in layer.sparsity.values()]
        return sum(values) / max(1, len(values))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["permutations"] = sorted(self.permutations)
        return out


# Magnitude ranks weights without activations; the first calibration row's first tokens,
# run through the layers, tell which linears they call (the rest stay dense).
_PROBE_TOKENS = 16

# Below this share of the decoder layers' weights in pruned layers, prune_model warns: the
# architecture keeps weights in modules of its own. Routers, norms and convolutions of
# hybrid models hold far less than 5%.
_COVERED_WARN = 0.95


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of ``block``, by their names in it: ``nn.Linear`` (and subclasses
    that compute the same, such as Falcon's; not routers that subclass it), ``Conv1D``."""
    return {n: m for n, m in block.named_modules() if computes_linear(m)}


def prunable_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    """The ``(out, in)`` weights that prune_model prunes in ``block``, by linear name: views
    of the model's own weights (one per expert and projection of fused experts)."""
    with expert_linears(block):  # the views outlive the per-expert modules
        return {name: linear_weight(mod) for name, mod in linear_layers(block).items()}


def _embedding_ancestors(model: nn.Module) -> list[str]:
    """The names (each with a trailing dot; ``""`` for ``model``) of the modules that hold
    ``model``'s input embeddings, innermost first; ``[""]`` when it has none."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return [""]
    name = next((n for n, m in model.named_modules() if m is embeddings), "")
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) + "." for i in range(len(parts), 0, -1)] + [""]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the largest ModuleList of blocks that contain linear layers in the
    innermost module that holds both it and the input embeddings (a vision-language model's
    language model, not its vision encoder, however many blocks that has), and not inside
    another such list's blocks (a layer's experts). Lists of one kind of block come first;
    a list that mixes kinds (Jamba's attention and Mamba layers, Mllama's self- and
    cross-attention layers) is taken where the module holds no other.

    Raises:
        ValueError: no such list, or its blocks share parameters (Zamba's shared
            transformer block), which pruning layer by layer would prune once per layer: named.
    """
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0
             and any(linear_layers(b) for b in mod)]
    # A list inside another's blocks (a mixture's experts as a ModuleList of MLPs, in older
    # transformers) is part of a layer, however many experts it holds.
    lists = [(name, mod) for name, mod in lists if not any(name.startswith(outer + ".") for outer, _ in lists)]
    for prefix in _embedding_ancestors(model):
        inside = [(name, mod) for name, mod in lists if name.startswith(prefix)]
        if inside:
            same = [(name, mod) for name, mod in inside if len({type(b) for b in mod}) == 1]
            # the first of the largest; a mixed list only where there is no list of one kind
            name, layers = max(same or inside, key=lambda item: len(item[1]))
            _check_not_shared(name, layers)
            return name, layers
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers holding linear layers; "
                     "prune_model works on decoder-only language models such as LLaMA, Mistral, Qwen2, OPT, GPT-2, "
                     "and on the language model of vision-language models")


def _check_not_shared(name: str, layers: nn.ModuleList) -> None:
    owner: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for pname, param in layer.named_parameters(remove_duplicate=False):
            first = owner.setdefault(id(param), index)
            if first != index:
                raise ValueError(f"decoder layers {first} and {index} of {name} share the parameter {pname} (a block "
                                 "shared between layers, as Zamba's): prune_model prunes layer by layer and would "
                                 "prune it once for each layer that uses it, so it does not take such models")


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _onloaded(layer: nn.Module, device: torch.device | None):
    """``layer`` on ``device`` (None: where its parameters are) for the block, then back
    where it was; yields the working device. Activations are the caller's to move."""
    home = _first_device(layer)
    work = device or home
    if work != home:
        layer.to(work)
    yield work
    if work != home:
        layer.to(home)


# -- the methods: what each collects from a decoder layer's calibration run, and how it prunes one linear


def _collect_norms(layer: nn.Module, linears: dict[str, nn.Module], run: Callable[[], None], backend: str) -> dict:
    """Wanda: ``{name: (calls, in_features) fp32}``, each forward call's ``sum_t x[t, j]**2``
    (a linear the run never called has no entry)."""
    names = set(linears)
    with ActNormCollector(layer, include=lambda n, m: n in names, backend=backend, per_call=True) as col:
        run()
    return col.call_sq_norms()


@contextlib.contextmanager
def _calls_seen(linears: dict[str, nn.Module]):
    """The set of the names of ``linears`` called while the block runs (filled as they are)."""
    seen: set[str] = set()
    handles = [mod.register_forward_pre_hook(lambda module, args, name=name: seen.add(name))
               for name, mod in linears.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _combine_norms(rows: dict, shard: Shard) -> dict:
    """``{name: ||X_j||_2}`` (fp32 ``(in_features,)``) over every rank's calls, in sample order."""
    return {name: shard.sum_rows(r).sqrt_() for name, r in rows.items()}


def _collect_hessians(layer: nn.Module, linears: dict[str, nn.Module], run: Callable[[], None], backend: str) -> dict:
    """SparseGPT: ``{name: X^T X}`` (fp64 ``(in, in)``) of every linear's inputs over the run."""
    return collect_hessians(linears, run)


def _combine_hessians(hessians: dict, shard: Shard) -> dict:
    """The Hessians summed over the ranks (fp64, in place)."""
    return {name: shard.sum_fp64(h) for name, h in hessians.items()}


def _prune_by_score(weight: torch.Tensor, norms: torch.Tensor | None, spec: PruneSpec) -> None:
    apply_mask_(weight, norms, spec, write_weight=True, want_mask=False)


def _prune_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, spec: PruneSpec) -> None:
    sparsegpt_prune_(weight, hessian, spec.sparsity, nm=spec.nm)


@dataclass(frozen=True)
class Method:
    """A pruning method.

    * ``collect(layer, linears, run, backend) -> {name: stats}``: this process's statistics
      while ``run()`` runs its calibration samples through the layer (None: needs no
      activations);
    * ``combine(stats, shard) -> {name: stats}``: the statistics of every sample over all
      ranks (the only step with collectives), the same bits for any number of ranks;
    * ``prune(weight (out, in), stats of that linear or None, spec)``, in place.
    """

    collect: Callable | None
    prune: Callable[[torch.Tensor, torch.Tensor | None, PruneSpec], None]
    combine: Callable[[dict, Shard], dict] | None = None
    metric: str = "wanda"  # the score of the mask selection, for methods that select by score


METHODS: dict[str, Method] = {
    "wanda": Method(collect=_collect_norms, combine=_combine_norms, prune=_prune_by_score),
    "magnitude": Method(collect=None, prune=_prune_by_score, metric="magnitude"),
    "sparsegpt": Method(collect=_collect_hessians, combine=_combine_hessians, prune=_prune_sparsegpt),
}


def _prune_dsnot(weight: torch.Tensor, gram: torch.Tensor, spec: PruneSpec) -> None:
    """Wanda's (or RIA's) mask, with ``||X_j|| = sqrt((X^T X)_jj)``, refined by DSnoT swaps (:mod:`.dsnot`)."""
    keep = apply_mask_(weight, _input_norms(gram), spec, write_weight=False, want_mask=True)
    keep = dsnot_refine(weight, keep, gram, nm=spec.nm)
    weight.mul_(keep).add_(0.0)  # pruned: +0.0 (x * False is -0.0 for x < 0; -0.0 + 0.0 is +0.0)


# DSnoT needs X^T X, whose diagonal holds Wanda's squared norms: one collection serves both.
DSNOT = Method(collect=_collect_hessians, combine=_combine_hessians, prune=_prune_dsnot)


def _input_norms(stats: torch.Tensor) -> torch.Tensor:
    """``||X_j||`` ``(in,)`` fp32 from a method's statistics: the norms, or the square root of diag(X^T X)."""
    return stats if stats.dim() == 1 else torch.diagonal(stats).float().clamp_min(0).sqrt().contiguous()


def _permute_stats(stats: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The statistics of the layer with its inputs in ``perm``'s order (norms ``[perm]``, X^T X both ways)."""
    return stats[perm] if stats.dim() == 1 else stats[perm][:, perm].contiguous()


def check_options(method: str, sparsity, pattern: str, *, scope: str | None = None, backend: str = "auto",
                  metric: str | None = None, owl: bool = False, owl_lambda: float = owl_alloc.DEFAULT_LAMBDA,
                  owl_m: float = owl_alloc.DEFAULT_M, permute: bool = False,
                  dsnot: bool = False) -> tuple[PruneSpec, Method]:
    """Check :func:`prune_model`'s options (no model needed); return the spec and the :class:`Method` that runs.

    Raises ValueError/TypeError naming the option (the CLI calls it before loading anything).
    """
    check_choice("method", method, tuple(METHODS))
    if method != "magnitude" and scope not in (None, "row"):
        raise ValueError(f"scope={scope!r} applies to method='magnitude' only")
    if method == "magnitude" and scope is None:
        scope = "layer" if pattern == "unstructured" else "row"
    chosen = METHODS[method]
    if metric is not None and metric != chosen.metric and (method != "wanda" or metric not in ("wanda", "ria")):
        raise ValueError(f"metric={metric!r} does not apply to method={method!r}: method='wanda' takes metric="
                         "'wanda' or 'ria'; 'magnitude' and 'sparsegpt' rank by their own scores")
    for name, value in (("owl", owl), ("permute", permute), ("dsnot", dsnot)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False; got {value!r}")
    spec = prune_spec(sparsity, pattern, metric or chosen.metric, scope or "row", backend)
    if owl:
        if spec.nm is not None:
            raise ValueError(f"owl=True gives each decoder layer its own sparsity, but pattern={pattern!r} fixes "
                             "every layer's at 1 - N/M; use pattern='unstructured'")
        owl_alloc.check_owl(spec.sparsity, owl_lambda, owl_m)
    if permute and spec.nm is None:
        raise ValueError("permute=True reorders input channels so that N:M groups keep more; it does nothing for "
                         f"pattern={pattern!r}: use an N:M pattern such as '2:4'")
    if permute and method == "magnitude":
        raise ValueError("permute=True needs calibration statistics: use method='wanda' or 'sparsegpt'")
    if permute and importlib.util.find_spec("scipy") is None:
        raise ImportError("permute=True needs scipy (its linear sum assignment): pip install scipy, or "
                          "pip install 'wanda-kernels[llm]'")
    if dsnot:
        if method != "wanda":
            raise ValueError(f"dsnot=True refines a Wanda (or RIA) mask without a weight update; got method="
                             f"{method!r}")
        chosen = DSNOT
    return spec, chosen


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
    metric: str | None = None,
    owl: bool = False,
    owl_lambda: float = owl_alloc.DEFAULT_LAMBDA,
    owl_m: float = owl_alloc.DEFAULT_M,
    permute: bool = False,
    dsnot: bool = False,
) -> PruneReport:
    """Prune every linear layer inside the decoder layers of ``model``, in place.

    Args:
        model: a Hugging Face decoder-only model (or any model whose decoder layers form an
            ``nn.ModuleList`` and whose forward takes ``input_ids``), in eval mode.
        calib: ``(nsamples, seqlen)`` int64 token ids (see :func:`wanda_kernels.llm.data.sample_windows`).
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
        progress: show a tqdm bar over the layers (on rank 0 only when distributed).
        metric: method ``"wanda"`` only: ``"wanda"`` (default) or ``"ria"`` (RIA's relative
            importance, see :func:`wanda_kernels.prune_`).
        owl: unstructured only: a sparsity per decoder layer from its share of outlier
            scores (OWL, :mod:`.owl`), the model's mean exactly ``sparsity``; costs one
            calibration pass over the dense layers. ``owl_lambda`` (the spread: layers
            span ``sparsity +- 2 owl_lambda`` at most) and ``owl_m`` (outliers: scores
            above ``owl_m`` x the layer's mean) as in the paper.
        permute: N:M only, methods ``"wanda"`` and ``"sparsegpt"``: permute each layer's
            input channels so that the N:M groups keep more of the scores
            (:mod:`.permute`). Folded into the producing layers where that is exact
            (``down_proj``, ``o_proj``); for the others the report's ``permutations``
            hold the order, which ``sparsify_``/``save_compressed`` give ``SparseLinear``
            (the dense model's outputs need nothing: its zeros are in place).
        dsnot: method ``"wanda"`` only: refine each mask by DSnoT prune-and-grow swaps that
            lower the layer's reconstruction error on the calibration tokens
            (:mod:`.dsnot`); counts per row (per group) unchanged.

    Distributed: with an initialised ``torch.distributed`` group of two or more ranks
    (``torchrun``), call it on every rank with the same model and ``calib``: each rank runs
    its contiguous share of the samples (``device``: its own GPU with NCCL), and every
    rank ends with the same pruned model, bit-identical to a one-process run
    (:mod:`wanda_kernels.llm.distributed`). Only rank 0 shows progress and logs.

    Mixture-of-experts blocks whose experts transformers keeps in 3-D weights are pruned
    expert by expert (:mod:`.experts`), each with the norms (or ``X^T X``) of the tokens
    routed to it; an expert no calibration token reached is pruned by magnitude, with a
    warning. A linear its layer never calls (Mamba's ``dt_proj``, whose weight the mixer
    multiplies itself) is left dense by every method and named in a warning (magnitude
    runs 16 tokens of the first sample through the layers to see which linears they call).
    A warning also says when the pruned layers hold less than 95% of the decoder
    layers' weights (weights in modules of other kinds stay dense).

    Returns:
        A :class:`PruneReport` with the sparsity reached per linear, the time per layer,
        the world size and each rank's calibration tokens, and the share of the decoder
        layers' weights pruned (``pruned_weight_fraction``), the number of expert
        projections among the linears (``expert_linears``), the uncalibrated ones, the
        linears left dense because their layer never calls them (``uncalled``) and the
        decoder layers left dense because the model's forward skips them on token ids
        alone (``skipped_layers``: Mllama's cross-attention layers, with a warning).

    Raises:
        ValueError, TypeError: a bad option, a linear that cannot take the pattern, or a
            weight holding NaN or Inf (all named); then no weight has changed. Also when
            ranks were given different ``calib``, or fewer samples than ranks.
        RankFailed: distributed, another rank raised (its rank and message are named).
    """
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
        raise ValueError(f"calib must be an int64 tensor (nsamples, seqlen); got "
                         f"{getattr(calib, 'dtype', type(calib).__name__)} {tuple(getattr(calib, 'shape', ()))}")
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if value is not None:
            check_positive_int(name, value)
    calib = calib[: nsamples or calib.shape[0], : seqlen or calib.shape[1]]
    spec, chosen = check_options(method, sparsity, pattern, scope=scope, backend=backend, metric=metric, owl=owl,
                                 owl_lambda=owl_lambda, owl_m=owl_m, permute=permute, dsnot=dsnot)
    device = torch.device(device) if device is not None else None
    layers_name, layers = find_decoder_layers(model)
    shard = current_shard(calib.shape[0], device)
    if shard.distributed:
        shard.check_same("calib (the calibration token ids)", _fingerprint(calib))
    with shard.step("checking the weights"):
        covered_numel, total, dense = _check_weights(layers_name, layers, spec)  # every linear, before any is touched
    covered = covered_numel / max(1, total)
    if covered < _COVERED_WARN and shard.is_main:
        largest = sorted(dense.items(), key=lambda item: -item[1])
        held = ", ".join(f"{n / max(1, total):.1%} in {cls}" for cls, n in largest[:3])
        warnings.warn(f"the linear layers (and fused experts) that prune_model prunes hold {covered:.1%} of the "
                      f"weights of {type(model).__name__}'s decoder layers; the rest (modules of other kinds) stays "
                      f"dense: {held}{', ...' if len(largest) > 3 else ''}", RuntimeWarning, stacklevel=2)

    t_start = time.perf_counter()
    report = PruneReport(method=method, pattern=pattern, sparsity=spec.sparsity, nsamples=calib.shape[0],
                         seqlen=calib.shape[1], world_size=shard.world_size,
                         calib_tokens_per_rank=[n * calib.shape[1] for n in shard.samples_per_rank()],
                         options=dict(metric=spec.metric, owl=owl, permute=permute, dsnot=dsnot,
                                      **(dict(owl_lambda=owl_lambda, owl_m=owl_m) if owl else {})),
                         pruned_weight_fraction=covered)
    inps = calls = None
    t0 = time.perf_counter()
    with shard.step("capturing the first decoder layer's inputs and every layer's arguments"):
        if chosen.collect is not None or owl:
            inps, calls = capture_layer_inputs(model, layers, calib[shard.start : shard.stop], device,
                                               warn=shard.is_main)
        else:  # magnitude ranks without activations; a few tokens tell which linears the layers call
            inps, calls = capture_layer_inputs(model, layers, calib[:1, :_PROBE_TOKENS], device, warn=shard.is_main)
    report.forward_seconds += time.perf_counter() - t0
    # Layers the model's forward skips on token ids alone (Mllama's cross-attention layers):
    # no input reaches them, so they are neither calibrated, pruned nor run.
    run_here = [index for index, call in enumerate(calls) if call is not None]
    report.skipped_layers = [index for index, call in enumerate(calls) if call is None]
    targets = [spec.sparsity if call is not None else 0.0 for call in calls]
    if owl:
        t0 = time.perf_counter()
        ratios = _outlier_ratios(layers, run_here, inps, calls, device, backend, shard, owl_m,
                                 progress and shard.is_main)
        sizes = [sum(w.numel() for w in prunable_weights(layers[i]).values()) for i in run_here]
        for index, target in zip(run_here, owl_alloc.layer_sparsities(ratios, spec.sparsity, owl_lambda, sizes)):
            targets[index] = target
        report.layer_targets = targets
        report.owl_seconds = time.perf_counter() - t0

    # Read back once, after the last layer: zeros per linear, and whether any collected
    # statistic (Wanda's norms, SparseGPT's Hessians) was not finite. Nothing on the
    # per-layer path waits for the GPU except the phase timings (_synchronize).
    zeros: list[tuple[LayerReport, str, int, torch.Tensor]] = []  # (report, linear, numel, zero count)
    left_dense = 0  # weights of linears that prune_model takes but leaves dense: never called, or in skipped layers
    nonfinite: list[tuple[int, torch.Tensor]] = []
    unreached: list[tuple[str, torch.Tensor]] = []  # (expert linear's name in the model, no token reached it)
    bar = progress_bar(layers, progress and shard.is_main, f"{method} {pattern}")
    for index, layer in enumerate(bar):
        if calls[index] is None:
            left_dense += sum(w.numel() for w in prunable_weights(layer).values())
            continue
        t_layer = time.perf_counter()
        # the activations stay on the working device for the next layer; experts are attached once it is there
        with _onloaded(layer, device) as work, expert_linears(layer) as experts:
            linears = linear_layers(layer)
            stats: dict = {}
            t0 = time.perf_counter()
            with shard.step(f"calibrating decoder layer {index}"), _calls_seen(linears) as called:
                inps, call = inps.to(work), calls[index].to(work)
                run = _replaying(experts, functools.partial(run_layer, layer, inps, call))
                if chosen.collect is not None:
                    stats = chosen.collect(layer, linears, run, backend)
                else:
                    run()  # magnitude: only to see which linears are called
                _synchronize(work)
            report.forward_seconds += time.perf_counter() - t0
            # A linear its layer never calls (Mamba's dt_proj, whose weight the mixer multiplies
            # itself) has no inputs to rank by, and no sparse module could stand in for it: left
            # dense. (A fused expert no token reached is called, with no tokens.)
            uncalled = [name for name in linears if name not in called]
            shard.check_same(f"the set of linear layers decoder layer {index} called",
                             [name in called for name in linears],
                             fix="a linear called on some calibration samples only (an expert kept as a module of its "
                                 "own) must be reached on every rank: give each rank more samples")
            report.uncalled += [f"{layers_name}.{index}.{name}" for name in uncalled]
            left_dense += sum(linear_weight(linears.pop(name)).numel() for name in uncalled)
            if chosen.collect is not None:
                t0 = time.perf_counter()
                stats = chosen.combine(stats, shard)
                _synchronize(work)
                report.comm_seconds += time.perf_counter() - t0
                if stats:
                    nonfinite.append((index, torch.stack([~torch.isfinite(v).all() for v in stats.values()]).any()))
                for name in experts.names:
                    stats[name], missed = _uncalibrated_fallback(stats[name])
                    unreached.append((f"{layers_name}.{index}.{name}", missed))
            report.expert_linears += len(experts.names)
            t0 = time.perf_counter()
            layer_spec = replace(spec, sparsity=targets[index])
            perms: dict[str, torch.Tensor] = {}
            if permute:
                with shard.step(f"permuting the inputs of decoder layer {index}"):
                    # not the experts' views: no sparse module could gather their inputs
                    permutable = {n: m for n, m in linears.items() if n not in experts.names}
                    perms, stats, folded = _permute_layer(layer, permutable, stats, spec, shard)
                report.folded += [f"{layers_name}.{index}.{name}" for name in folded]
                report.permutations.update({f"{layers_name}.{index}.{name}": p.cpu() for name, p in perms.items()})
            owners = shard.owners([mod.weight.numel() for mod in linears.values()])
            with shard.step(f"pruning decoder layer {index}"):
                for (name, mod), owner in zip(linears.items(), owners):
                    if owner == shard.rank:  # each linear is pruned by one rank, then broadcast
                        _prune_linear(chosen, linear_weight(mod), stats.get(name), layer_spec, perms.get(name))
                _synchronize(work)
            report.prune_seconds += time.perf_counter() - t0
            if shard.distributed:
                t0 = time.perf_counter()
                shard.broadcast_([mod.weight.data for mod in linears.values()], owners)
                _synchronize(work)
                report.comm_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            with shard.step(f"running pruned decoder layer {index}"):
                inps = run_layer(layer, inps, call)  # the next layer sees the pruned layer's outputs
                _synchronize(work)
            report.forward_seconds += time.perf_counter() - t0
            layer_report = LayerReport(index=index, seconds=time.perf_counter() - t_layer, sparsity={})
            report.layers.append(layer_report)
            for name, mod in linears.items():
                weight = linear_weight(mod)
                zeros.append((layer_report, name, weight.numel(), (weight == 0).sum()))
    for (layer_report, name, numel, _), count in zip(zeros, _to_host([c for *_, c in zeros])):
        layer_report.sparsity[name] = count / numel
    bad = [index for (index, _), flag in zip(nonfinite, _to_host([f for _, f in nonfinite])) if flag]
    report.uncalibrated = [name for (name, _), flag in zip(unreached, _to_host([f for _, f in unreached])) if flag]
    report.pruned_weight_fraction = (covered_numel - left_dense) / max(1, total)
    if report.skipped_layers and shard.is_main:
        kinds = sorted({type(layers[i]).__name__ for i in report.skipped_layers})
        warnings.warn(f"{type(model).__name__}'s forward does not call its decoder layers {report.skipped_layers} "
                      f"({', '.join(kinds)}) on token ids alone (as Mllama's cross-attention layers, without an "
                      "image), so no calibration input reaches them: they were left dense "
                      f"(PruneReport.skipped_layers), and the pruned layers hold {report.pruned_weight_fraction:.1%} "
                      "of the decoder layers' weights",
                      RuntimeWarning, stacklevel=2)
    if report.uncalled and shard.is_main:
        warnings.warn(f"{len(report.uncalled)} linear layers ({', '.join(report.uncalled[:2])}"
                      f"{', ...' if len(report.uncalled) > 2 else ''}) were never called by their decoder layer's "
                      "forward on the calibration samples (the model reads their weight itself, as Mamba's dt_proj; "
                      "or no calibration token reached an expert kept as a module of its own), so there was "
                      "nothing to rank their weights by and no sparse module could stand in for them: they were "
                      f"left dense, and the pruned layers hold {report.pruned_weight_fraction:.1%} of the decoder "
                      "layers' weights (PruneReport.uncalled lists them)", RuntimeWarning, stacklevel=2)
    if report.uncalibrated and shard.is_main:
        warnings.warn(f"{len(report.uncalibrated)} expert projections ({', '.join(report.uncalibrated[:2])}"
                      f"{', ...' if len(report.uncalibrated) > 2 else ''}) got no calibration token, so there was "
                      "nothing to rank their weights by: they were pruned by weight magnitude "
                      "(PruneReport.uncalibrated lists them; more calibration samples reach more experts)",
                      RuntimeWarning, stacklevel=2)
    if bad and shard.is_main:
        warnings.warn(f"decoder layers {bad} saw non-finite activations during calibration (overflow in "
                      f"{next(iter(model.parameters())).dtype}?): the statistics their masks were chosen from are "
                      "not finite, so those masks are not meaningful",
                      RuntimeWarning, stacklevel=2)
    report.total_seconds = time.perf_counter() - t_start
    if shard.is_main:
        logger.info("pruned %d decoder layers (%s, %s) in %.1f s on %d process%s; mean sparsity %.4f",
                    len(report.layers), method, pattern, report.total_seconds, shard.world_size,
                    "es" if shard.world_size > 1 else "", report.overall_sparsity())
    return report


def _prune_linear(chosen: Method, weight: torch.Tensor, stats, spec: PruneSpec, perm: torch.Tensor | None) -> None:
    """``chosen.prune`` on ``weight`` (with ``perm``: on its columns in that order, written back in place)."""
    if perm is None:
        chosen.prune(weight, stats, spec)
        return
    permuted = weight[:, perm]  # a copy; stats already in perm's order
    chosen.prune(permuted, stats, spec)
    weight[:, perm] = permuted


def _permute_layer(layer: nn.Module, linears: dict[str, nn.Module], stats: dict, spec: PruneSpec, shard: Shard):
    """Choose the N:M input permutations of one decoder layer; fold those that can be folded.

    Returns ``(perms, stats, folded)``: the runtime permutations by linear name, the
    statistics in the permuted input order, and the names whose permutation went into
    the weights (:data:`~.permute.FOLDS`). Linears that read the same input (equal norms,
    bit for bit) share one permutation. Distributed, every rank applies rank 0's choice
    (a search on other hardware could round its sums differently).
    """
    n, m = spec.nm
    norms = {name: _input_norms(stats[name]) for name in linears}

    def scores(names):
        return torch.cat([score_matrix(linear_weight(linears[k]), norms[k], spec.metric) for k in names])

    folds = []  # (consumer name, producers, head_dim or None, perm)
    for rule in FOLDS:
        consumer = linears.get(rule.consumer)
        producers = [linears.get(k) for k in rule.producers]
        if not isinstance(consumer, nn.Linear) or not all(isinstance(p, nn.Linear) for p in producers):
            continue
        if not rule.per_head:
            folds.append((rule.consumer, producers, None, nm_permutation(scores([rule.consumer]), n, m)))
            continue
        head_dim = getattr(layer.get_submodule(rule.consumer.rpartition(".")[0]), "head_dim", None)
        if not isinstance(head_dim, int) or head_dim % m or consumer.in_features % head_dim \
                or any(p.out_features % head_dim for p in producers):
            continue
        s = scores([rule.consumer])
        s = s.reshape(s.shape[0], -1, head_dim).transpose(0, 1).reshape(-1, head_dim)  # heads as extra rows
        folds.append((rule.consumer, producers, head_dim, nm_permutation(s, n, m)))
    shard.broadcast_([f[-1] for f in folds], [0] * len(folds))
    stats = dict(stats)
    for name, producers, head_dim, perm in folds:
        fold_(linears[name], producers, perm, head_dim)
        full = perm if head_dim is None else head_permutation(perm, linears[name].in_features)
        stats[name] = _permute_stats(stats[name], full)
    # The rest, on the weights as folded (v_proj's rows, gate/up's rows are permuted now).
    groups: list[list[str]] = []
    for name in linears:
        if any(name == f[0] for f in folds):
            continue
        group = next((g for g in groups if torch.equal(norms[g[0]], norms[name])), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    runtime = [(group, nm_permutation(scores(group), n, m)) for group in groups]
    shard.broadcast_([perm for _, perm in runtime], [0] * len(runtime))
    perms = {}
    for group, perm in runtime:
        if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
            continue
        for name in group:
            perms[name] = perm
            stats[name] = _permute_stats(stats[name], perm)
    return perms, stats, [f[0] for f in folds]


@torch.no_grad()
def _outlier_ratios(layers, indices: list[int], inps, calls: list[LayerCall | None], device, backend: str,
                    shard: Shard, m: float, progress: bool) -> list[float]:
    """OWL's calibration pass: the share of outlier Wanda scores of each dense decoder layer
    of ``indices`` (those the model calls), layer by layer."""
    ratios = []
    for index in progress_bar(indices, progress, "OWL outlier ratios"):
        layer = layers[index]
        with _onloaded(layer, device) as work, expert_linears(layer) as experts:
            linears = linear_layers(layer)
            with shard.step(f"OWL: measuring decoder layer {index}"):
                inps, call = inps.to(work), calls[index].to(work)
                out: list[torch.Tensor] = []  # the layer's outputs: the next layer's inputs
                run = _replaying(experts, functools.partial(_run_into, out, layer, inps, call))
                norms = _combine_norms(_collect_norms(layer, linears, run, backend), shard)
                ratios.append(owl_alloc.outlier_ratio(  # (a linear never called has no norms: left dense)
                    [linear_weight(mod).abs().float() * norms[name][None, :] for name, mod in linears.items()
                     if name in norms], m))
                inps = out[0]
    return ratios


def _replaying(experts: ExpertLinears, run: Callable[[], object]) -> Callable[[], None]:
    """``run`` with the fused experts' per-expert linears run too, so statistics hooks see their inputs."""
    def replayed() -> None:
        with experts.replay():
            run()

    return replayed


def _uncalibrated_fallback(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert linear's statistics, or those of unit inputs where no token reached it (all zero).

    Zero norms make every Wanda score 0 (a tie over the whole row), and so does the zero
    diagonal of ``X^T X`` for DSnoT; unit norms (the identity) rank by ``|W|`` instead,
    and SparseGPT with the identity prunes by ``|W|`` with no weight update (as it treats
    all-dead inputs anyway). Returns the statistics and whether they were replaced (a 0-d
    bool tensor: no read-back here).
    """
    if stats.dim() == 1:
        missed = ~stats.any()
        return torch.where(missed, torch.ones_like(stats), stats), missed
    missed = ~torch.diagonal(stats).any()
    eye = torch.eye(stats.shape[0], dtype=stats.dtype, device=stats.device)
    return torch.where(missed, eye, stats), missed


def _fingerprint(calib: torch.Tensor) -> list[int]:
    """Integers that differ, short of a collision, when two ranks' token ids differ (one read-back)."""
    weights = torch.arange(1, calib.numel() + 1, device=calib.device).view_as(calib)
    return [*calib.shape, *torch.stack([calib.sum(), (calib * weights).sum()]).tolist()]


def _check_weights(layers_name: str, layers: nn.ModuleList, spec: PruneSpec) -> tuple[int, int, dict[str, int]]:
    """Every linear's weight: dtype, shape and pattern, then finite values, read back in one transfer per device.

    Returns the number of weights the pruning covers, the number of the decoder layers'
    weights (parameters of 2 or more dimensions), and the rest by the class of the
    module that holds them (``{"GptOssExperts": n}``), for the coverage warning.
    """
    names, finite = [], []
    covered = total = 0
    dense: dict[str, int] = {}
    for index, layer in enumerate(layers):
        weights = prunable_weights(layer)
        # A pruned weight is a parameter or a view of one (an expert's slice): its storage tells.
        pruned = {(w.device, w.untyped_storage().data_ptr()) for w in weights.values()}
        for name, param in layer.named_parameters():  # each shared parameter once
            if param.dim() >= 2:
                total += param.numel()
                if (param.device, param.untyped_storage().data_ptr()) not in pruned:
                    owner = type(layer.get_submodule(name.rpartition(".")[0])).__name__
                    dense[owner] = dense.get(owner, 0) + param.numel()
        for name, weight in weights.items():
            names.append(f"{layers_name}.{index}.{name}.weight")
            check_prunable(weight, spec, name=names[-1])
            finite.append(torch.isfinite(weight).all())
            covered += weight.numel()
    bad = [name for name, ok in zip(names, _to_host(finite)) if not ok]
    if bad:
        raise ValueError(f"{len(bad)} weight{'s' if len(bad) > 1 else ''} of the model hold NaN or Inf values "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); pruning ranks weights by "
                         "score, and NaN or Inf has no rank. Nothing was pruned")
    return covered, total, dense


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so that a phase's time is its own (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_host(scalars: list[torch.Tensor]) -> list:
    """Python numbers from 0-d tensors on any devices, one transfer per device."""
    out: list = [None] * len(scalars)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(scalars):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([scalars[i] for i in idx]).tolist()):
            out[i] = v
    return out


def _run_into(out: list, layer, inps, call: LayerCall) -> None:
    out.append(run_layer(layer, inps, call))
