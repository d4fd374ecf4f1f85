"""Public pruning functions: validate once, then dispatch to Triton or torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import _torch_impl
from ._backend import resolve_backend
from ._linear_like import is_conv1d, linear_weight
from ._validation import (
    BACKENDS,
    METRICS,
    SCOPES,
    check_choice,
    check_divisible,
    check_score_inputs,
    check_sparsity,
    check_weight,
    num_pruned,
    parse_pattern,
)

logger = logging.getLogger("wanda_kernels")

__all__ = ["prune_", "prune_mask", "RIA_POWER"]

# RIA's exponent of the activation norm, ``||X_j||^a`` (Zhang et al., ICLR 2024: a = 0.5).
RIA_POWER = 0.5


@dataclass(frozen=True)
class PruneSpec:
    """Validated pruning options (all but the tensors); build with :func:`prune_spec`."""

    sparsity: float
    nm: tuple[int, int] | None  # None: unstructured
    metric: str
    scope: str
    backend: str


def prune_spec(sparsity=None, pattern="unstructured", metric="wanda", scope="row", backend="auto") -> PruneSpec:
    """Check the options of :func:`prune_` once; raise TypeError/ValueError naming the bad one."""
    check_choice("metric", metric, METRICS)
    check_choice("scope", scope, SCOPES)
    check_choice("backend", backend, BACKENDS)
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    if nm is not None and scope != "row":
        raise ValueError(f"scope={scope!r} applies to unstructured sparsity only; got pattern={pattern!r}")
    return PruneSpec(sparsity=sparsity, nm=nm, metric=metric, scope=scope, backend=backend)


def check_prunable(weight, spec: PruneSpec, name: str = "weight") -> torch.Tensor:
    """Check a weight ``(out, in)`` against ``spec`` (dtype, layout, N:M divisibility); return it."""
    check_weight(weight, name)
    check_divisible(weight.shape[1], spec.nm, name)
    return weight


def score_terms(weight: torch.Tensor, norms32: torch.Tensor | None, metric: str):
    """What ``metric`` multiplies ``|W|`` by: ``(norms, relative)`` for ``_torch_impl.score_keys``
    and the Triton mask kernels (one rule for the masks and for whatever ranks like them).

    ``weight (out, in)``, ``norms32 (in,)`` fp32 on its device. Wanda: ``(norms32, None)``;
    magnitude: ``(None, None)``; RIA: ``(norms32 ** RIA_POWER, relative_terms(weight))``,
    one extra pass over W for its row and column sums.
    """
    if metric == "magnitude":
        return None, None  # the magnitude score ignores activations
    if metric == "ria":
        return norms32 ** RIA_POWER, _torch_impl.relative_terms(weight)
    return norms32, None


def apply_mask_(weight: torch.Tensor, norms32: torch.Tensor | None, spec: PruneSpec, *, write_weight: bool,
                want_mask: bool) -> torch.Tensor | None:
    """Compute (and with ``write_weight`` apply) the keep-mask; no validation (the Triton path never syncs).

    The caller has checked ``weight`` with :func:`check_prunable` and passes ``norms32``
    as ``(in_features,)`` fp32 contiguous on the weight's device (None with
    ``metric="magnitude"``). Returns the bool keep-mask ``(out, in)`` when ``want_mask``.
    """
    rows, cols = weight.shape
    nm = spec.nm
    chosen = _implementation(spec, cols, weight.device)
    with torch.no_grad():
        norms32, relative = score_terms(weight, norms32, spec.metric)
        if chosen == "triton":
            from .kernels.wanda_mask import launch_wanda_mask

            mask = torch.empty(rows, cols, dtype=torch.bool, device=weight.device) if want_mask else None
            k = num_pruned(cols, spec.sparsity) if nm is None else None
            launch_wanda_mask(weight, norms32, k_prune=k, nm=nm, write_weight=write_weight, mask=mask,
                              relative=relative)
            return mask
        if nm is not None:
            keep = _torch_impl.keep_nm(weight, norms32, *nm, relative=relative)
        elif spec.scope == "layer":
            keep = _torch_impl.keep_layer(weight, norms32, num_pruned(weight.numel(), spec.sparsity), relative)
        else:
            keep = _torch_impl.keep_unstructured(weight, norms32, num_pruned(cols, spec.sparsity), relative)
        if write_weight:
            weight.masked_fill_(~keep, 0)
        return keep if want_mask else None


def _implementation(spec: PruneSpec, cols: int, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for this call; ValueError when backend="triton" cannot serve it."""
    chosen = resolve_backend(spec.backend, device)
    if chosen != "triton":
        return chosen
    if spec.scope == "layer":
        if spec.backend == "triton":
            raise ValueError("scope='layer' (one threshold over the whole matrix) has no Triton kernel; "
                             "use backend='auto' or 'torch'")
        return "torch"
    from .kernels.wanda_mask import MAX_UNSTRUCTURED_COLS

    if spec.nm is None and cols > MAX_UNSTRUCTURED_COLS:
        if spec.backend == "triton":
            raise ValueError(f"the unstructured Triton kernel holds rows of up to {MAX_UNSTRUCTURED_COLS} "
                             f"columns; weight has in_features={cols}. Use backend='auto' or 'torch'")
        logger.info("in_features=%d > %d: using the torch path", cols, MAX_UNSTRUCTURED_COLS)
        return "torch"
    return chosen


def _weight_of(layer) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight
    if isinstance(layer, torch.Tensor):
        return layer
    if is_conv1d(layer):  # weight stored (in, out): prune its (out, in) view in place
        return linear_weight(layer)
    raise TypeError(f"layer must be an nn.Linear or a 2-D weight tensor (or transformers' Conv1D); got "
                    f"{type(layer).__name__}")


def _run(layer, norms, sparsity, pattern, metric, backend, scope, *, write_weight, want_mask):
    """The public functions' one validation, then :func:`apply_mask_`."""
    weight = _weight_of(layer)
    spec = prune_spec(sparsity, pattern, metric, scope, backend)
    check_prunable(weight, spec)
    norms32 = check_score_inputs(weight, norms, metric)
    return apply_mask_(weight, norms32, spec, write_weight=write_weight, want_mask=want_mask)


def prune_(
    layer,
    norms: torch.Tensor | None,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    backend: str = "auto",
    return_mask: bool = False,
    scope: str = "row",
) -> torch.Tensor | None:
    """Prune a linear layer in place with Wanda (or magnitude) scores.

    Args:
        layer: an ``nn.Linear`` (its ``weight`` is pruned) or a weight tensor of shape
            ``(out_features, in_features)``; float16, bfloat16, float32 (or float64);
            CPU or CUDA; any strides. transformers' ``Conv1D`` (GPT-2), whose weight is
            stored ``(in, out)``, is pruned through its ``(out, in)`` view: the same rows.
        norms: ``(in_features,)`` floating tensor on the weight's device: ``||X_j||_2``,
            the L2 norm of input feature j over the calibration tokens (see
            :class:`ActNormCollector`). Finite and non-negative. May be None with
            ``metric="magnitude"``.
        sparsity: fraction of each row to prune, in ``[0, 1)``; every row loses exactly
            ``floor(sparsity * in_features)`` weights. Default 0.5; with an N:M pattern
            leave it unset (it is ``1 - N/M``) or pass exactly that value.
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``, any
            ``1 <= N < M <= 32`` with ``in_features % M == 0``): keep the N highest
            scores of every M consecutive inputs of a row.
        metric: ``"wanda"`` (``|W| * norms``), ``"magnitude"`` (``|W|``) or ``"ria"``
            (Relative Importance and Activations, Zhang et al. 2024:
            ``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * norms_j ** 0.5``; the
            row and column sums cost one extra read of W).
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"triton"``
            or ``"torch"``.
        return_mask: also return the keep-mask.
        scope: ``"row"`` (the paper's per-output comparison group) or ``"layer"``
            (one threshold over the whole matrix: the paper's magnitude baseline;
            unstructured only, torch path).

    Returns:
        ``None``, or with ``return_mask=True`` the keep-mask: bool
        ``(out_features, in_features)`` on the weight's device, True = kept.

    Raises:
        TypeError, ValueError: naming the bad argument; the weight is then unchanged.

    Ties are broken by column index: among equal scores the lower column is pruned
    first (unstructured) and kept first (N:M); :mod:`wanda_kernels.reference`
    spells the semantics out.
    """
    return _run(layer, norms, sparsity, pattern, metric, backend, scope, write_weight=True, want_mask=return_mask)


def prune_mask(
    weight,
    norms: torch.Tensor | None,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    backend: str = "auto",
    scope: str = "row",
) -> torch.Tensor:
    """The keep-mask :func:`prune_` would apply, leaving the weight untouched.

    Same arguments as :func:`prune_` (``weight`` may also be an ``nn.Linear`` or a ``Conv1D``).
    Returns bool ``(out_features, in_features)`` on the weight's device, True = kept.
    """
    return _run(weight, norms, sparsity, pattern, metric, backend, scope, write_weight=False, want_mask=True)
