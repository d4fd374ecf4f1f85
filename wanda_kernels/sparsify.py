"""Which layers of a model become sparse modules: ``sparsify_``; and ``announce_fallback``.

Two formats: ``"2:4"`` (:class:`~wanda_kernels.sparse_linear.SparseLinear`, sparse
tensor cores; layers whose weight is 2:4 sparse) and ``"bitmap"``
(:class:`~wanda_kernels.bitmap_linear.BitmapLinear`, any mask; layers with at least
``min_sparsity`` zeros).
"""

from __future__ import annotations

from torch import nn

from ._layout24 import DTYPES_24
from ._linear_like import computes_linear, is_linear_like, linear_features, linear_weight
from ._progress import progress_bar
from ._validation import check_choice, check_permutation
from .bitmap import DTYPES_BITMAP
from .bitmap_linear import BitmapLinear
from .bitmap_op import fallback_reason
from .bitmap_op import warn_fallback as warn_bitmap_fallback
from .gemm24 import policy
from .gemm24.op import warn_fallback
from .sparse24 import is_24_sparse
from .sparse_linear import SparseLinear

__all__ = ["sparsify_", "announce_fallback", "FORMATS"]

FORMATS = ("2:4", "bitmap")
DEFAULT_MIN_SPARSITY = 0.25


def _zero_fraction(linear: nn.Module) -> float:
    weight = linear.weight.detach()
    return float((weight == 0).sum()) / weight.numel()


def _replaceable(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """A linear layer that a sparse module computes the same as, and that its owner calls."""
    return computes_linear(module) and not isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention)


def sparsify_(model: nn.Module, filter_fn=None, *, format: str = "2:4", min_sparsity: float = DEFAULT_MIN_SPARSITY,
              progress: bool = False, permutations: dict | None = None) -> list[str]:
    """Replace, in place, the pruned linear layers of ``model`` by sparse modules.

    The linear layers: ``nn.Linear``, its subclasses whose forward computes the same
    ``x W^T + b`` (Falcon's ``FalconLinear``; see :func:`computes_linear`; routers and
    quantized layers that subclass it are left alone), and transformers' ``Conv1D``
    (GPT-2; its weight is stored ``(in, out)``, and the sparse module computes the same
    ``x @ W + b``). The ``out_proj`` of an ``nn.MultiheadAttention``, which reads its
    weight without calling it, is left alone too.

    Args:
        model: the module to modify.
        filter_fn: optional ``(module, fqn) -> bool`` (torchao's order): only the
            linear layers for which it returns True are considered; ``fqn`` is the
            name in ``model.named_modules()``.
        format: ``"2:4"``: every layer whose weight is 2:4 sparse becomes a
            ``SparseLinear``. ``"bitmap"``: every layer with at least ``min_sparsity`` of
            its weights zero becomes a ``BitmapLinear`` (unstructured or any N:M pattern).
        min_sparsity: for ``"bitmap"``, in (0, 1]. The default 0.25 is a threshold, not a
            measured break-even: below it the format saves less than 19% of the bytes,
            and dense layers (a few exact zeros at most) are never caught.
        progress: a tqdm bar over the layers being compressed (when tqdm is installed).
        permutations: ``{name: (in,) int64}`` for ``"2:4"``: layers whose weight is 2:4 with
            its inputs in that order (``PruneReport.permutations`` of
            ``prune_model(..., permute=True)``); they become ``SparseLinear`` with that
            ``perm`` (unless ``filter_fn`` leaves them out; a layer already replaced by an
            earlier call, or one of the layers left alone, is left as it is). The bitmap
            format stores any mask and ignores them.

    Returns:
        The names (as in ``model.named_modules()``) of the replaced layers.

    Raises:
        TypeError: a layer to replace is float32/float64 (convert the model to fp16/bf16 first).
        ValueError: ``model`` is itself a linear layer (use ``SparseLinear.from_linear``
            or ``BitmapLinear.from_linear``), a bad ``format`` or ``min_sparsity``, or a
            layer named in ``permutations`` that is not in the model, not a linear layer,
            or not 2:4 sparse in that input order (nothing is replaced then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    check_choice("format", format, FORMATS)
    if format == "bitmap" and (isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float))
                               or not 0 < min_sparsity <= 1):
        raise ValueError(f"min_sparsity must be a number in (0, 1]; got {min_sparsity!r}")
    if is_linear_like(model):
        raise ValueError("sparsify_ replaces submodules; for a single layer use SparseLinear.from_linear(linear) "
                         "or BitmapLinear.from_linear(linear)")
    if permutations is not None and not isinstance(permutations, dict):
        raise TypeError(f"permutations must be a dict of layer name -> permutation; got {type(permutations).__name__}")
    perms = dict(permutations or {}) if format == "2:4" else {}
    if format == "2:4":
        def chosen(m):
            return is_24_sparse(linear_weight(m))

        module_cls, dtypes, what = SparseLinear, DTYPES_24, "2:4 sparse"
    else:
        def chosen(m):
            return _zero_fraction(m) >= min_sparsity

        module_cls, dtypes, what = BitmapLinear, DTYPES_BITMAP, f"at least {min_sparsity:g} sparse"
    modules = dict(model.named_modules())
    unknown = sorted(set(perms) - set(modules))
    if unknown:
        raise ValueError(f"permutations name layers that are not in the model: {', '.join(unknown[:3])}")
    for name, perm in list(perms.items()):
        module = modules[name]
        if isinstance(module, SparseLinear):  # replaced by an earlier call: left as it is
            del perms[name]
        elif not is_linear_like(module):
            raise ValueError(f"permutations[{name!r}] names a {type(module).__name__}, not a linear layer")
        elif not _replaceable(name, module, modules):  # pruned in place, but stays dense: its order is unused
            del perms[name]
        else:
            perms[name] = check_permutation(perm, linear_features(module)[0], name=f"permutations[{name!r}]")
    targets = []
    for name, module in model.named_modules():
        if not _replaceable(name, module, modules):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if name in perms:
            weight = linear_weight(module)
            if not is_24_sparse(weight[:, perms[name].to(weight.device)]):
                raise ValueError(f"{name}: its weight is not 2:4 sparse with its inputs in the order of "
                                 f"permutations[{name!r}]; pass the permutations of the prune_model run that pruned "
                                 "this model (PruneReport.permutations, or checkpoint.load_permutations(folder))")
        elif not chosen(module):
            continue
        if module.weight.dtype not in dtypes:
            raise TypeError(f"{name} is {what} but {module.weight.dtype}; {module_cls.__name__} stores float16 or "
                            "bfloat16: convert the model first (model.half() or model.to(torch.bfloat16))")
        targets.append(name)
    # Convert all first, then swap: a failure leaves the model unchanged.
    replacements = {name: module_cls.from_linear(model.get_submodule(name), **({"perm": perms[name]} if name in perms
                                                                               else {}))
                    for name in progress_bar(targets, progress, f"compressing {format} layers")}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return targets


def announce_fallback(model: nn.Module) -> None:
    """Warn now, once per reason, if ``model``'s sparse layers will run dense where they are.

    For code that has just put a model on its device (e.g. ``load_compressed``): the
    warning then comes before any progress bar of the run, names how many layers it
    concerns, and is not repeated by the first forward.
    """
    counts: dict[tuple[str, str], int] = {}
    for module in model.modules():
        reason = None
        if isinstance(module, SparseLinear):
            reason = policy.kernel_unavailable(module.values.device, module.values.dtype, module.meta_format)
        elif isinstance(module, BitmapLinear) and module.backend == "auto":
            reason = fallback_reason(module.values.device)
        if reason is not None:
            key = (type(module).__name__, reason)
            counts[key] = counts.get(key, 0) + 1
    for (kind, reason), layers in counts.items():
        (warn_fallback if kind == "SparseLinear" else warn_bitmap_fallback)(reason, layers)
