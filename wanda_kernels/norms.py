"""Activation norms: ``||X_j||_2`` per input feature of each linear layer."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import _torch_impl
from ._backend import resolve_backend
from ._linear_like import is_linear_like
from ._validation import BACKENDS, check_choice

logger = logging.getLogger("wanda_kernels")

__all__ = ["accumulate_sq_norms_", "ActNormCollector"]

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def accumulate_sq_norms_(sq_norms: torch.Tensor, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Add the squared L2 norm of every input feature of ``x`` to ``sq_norms``, in place.

    ``sq_norms[j] += sum over all tokens t of x[t, j] ** 2``, accumulated in fp32,
    without a host sync.

    Args:
        sq_norms: ``(in_features,)`` float32 running sums, on ``x``'s device.
        x: ``(..., in_features)`` float16, bfloat16 or float32 activations, any
            leading dims and strides (leading dims that cannot be flattened as a
            view are copied).
        backend: ``"auto"`` (Triton for CUDA, torch for CPU), ``"triton"`` or ``"torch"``.

    Returns:
        ``sq_norms``.
    """
    if not isinstance(sq_norms, torch.Tensor) or not isinstance(x, torch.Tensor):
        bad = "sq_norms" if not isinstance(sq_norms, torch.Tensor) else "x"
        raise TypeError(f"{bad} must be a torch.Tensor; got {type(sq_norms if bad == 'sq_norms' else x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., in_features); got a 0-d tensor")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32; got {x.dtype}")
    if sq_norms.dtype != torch.float32:
        raise TypeError(f"sq_norms must be float32 (the accumulator); got {sq_norms.dtype}")
    if tuple(sq_norms.shape) != (x.shape[-1],):
        raise ValueError(f"sq_norms must have shape (in_features,) = ({x.shape[-1]},) for x of shape "
                         f"{tuple(x.shape)}; got {tuple(sq_norms.shape)}")
    if sq_norms.device != x.device:
        raise ValueError(f"sq_norms is on {sq_norms.device} but x is on {x.device}")
    check_choice("backend", backend, BACKENDS)
    x2d = x.detach().reshape(-1, x.shape[-1])
    with torch.no_grad():
        if resolve_backend(backend, x.device) == "triton":
            from .kernels.act_norms import launch_sq_norms

            if sq_norms.is_contiguous():
                launch_sq_norms(sq_norms, x2d)
            else:
                acc = sq_norms.contiguous()
                launch_sq_norms(acc, x2d)
                sq_norms.copy_(acc)
        else:
            _torch_impl.accumulate_sq_norms_(sq_norms, x2d)
    return sq_norms


def sum_call_rows(rows: torch.Tensor) -> torch.Tensor:
    """``(calls, ...)`` fp32 per-call sums -> ``(...)`` fp32: one ``sum(dim=0)`` in fp64, in row order.

    The one definition of how per-call statistics are combined, so that the collector's
    ``sq_norms`` and ``prune_model``'s distributed sum (the same rows gathered in sample
    order) give the same bits.
    """
    return rows.double().sum(dim=0).float()


class ActNormCollector:
    """Context manager that accumulates the input norms of a model's linear layers.

    While active, a forward pre-hook on each selected module adds the squared norms of
    its input features (over every token of every forward call) to a float32 buffer on
    the input's device, with :func:`accumulate_sq_norms_`.

    Example::

        with ActNormCollector(decoder_layer) as collector:
            for batch in calibration_batches:
                decoder_layer(batch)
        for name, norms in collector.norms().items():
            wanda_kernels.prune_(decoder_layer.get_submodule(name), norms, 0.5)

    Args:
        model: any ``nn.Module``.
        include: which modules to hook: None (every module of ``module_types``), glob
            patterns on module names (``"*.mlp.*"``) or a predicate ``(name, module) -> bool``.
        module_types: module classes to hook; default None: the linear layers,
            ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2). Each module's input must
            be ``(..., in_features)`` with features last.
        backend: passed to :func:`accumulate_sq_norms_`.
        per_call: keep each forward call's sums as a row of its own (fp32, summed from
            zero), in :meth:`call_sq_norms`; :meth:`sq_norms` then sums the rows in fp64.
            A call's terms then do not depend on the calls before it, which is what lets
            ``prune_model`` spread the calls over processes and still sum them in one order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
        module_types: tuple[type, ...] | None = None,
        backend: str = "auto",
        per_call: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        check_choice("backend", backend, BACKENDS)
        self.model = model
        self.backend = backend
        self.per_call = bool(per_call)
        if module_types is None:
            hooked, what = is_linear_like, "no linear layer (nn.Linear, Conv1D)"
        else:
            hooked = lambda m: isinstance(m, module_types)
            what = f"no module of type {[t.__name__ for t in module_types]}"
        self._modules = {name: mod for name, mod in model.named_modules()
                         if hooked(mod) and _included(include, name, mod)}
        if not self._modules:
            raise ValueError(f"{what} in the model matches include={include!r}")
        self._sq: dict[str, torch.Tensor] = {}
        self._calls: dict[str, list[torch.Tensor]] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list = []

    @property
    def module_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the hooked modules."""
        return list(self._modules)

    def __enter__(self) -> ActNormCollector:
        if self._handles:
            raise RuntimeError("ActNormCollector is already active")
        for name, mod in self._modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _make_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            buf = None if self.per_call else self._sq.get(name)
            if buf is None:
                buf = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
                if self.per_call:
                    self._calls.setdefault(name, []).append(buf)
                else:
                    self._sq[name] = buf
            accumulate_sq_norms_(buf, x, backend=self.backend)
            self._tokens[name] = self._tokens.get(name, 0) + x.numel() // max(1, x.shape[-1])

        return hook

    def sq_norms(self) -> dict[str, torch.Tensor]:
        """``{name: (in_features,) float32}``: the accumulated ``sum_t x[t, j]**2``."""
        if self.per_call:
            return {name: sum_call_rows(rows) for name, rows in self.call_sq_norms().items()}
        return dict(self._sq)

    def call_sq_norms(self) -> dict[str, torch.Tensor]:
        """``{name: (calls, in_features) float32}``: each call's ``sum_t x[t, j]**2``, in call order.

        Raises:
            RuntimeError: the collector was made without ``per_call=True``.
        """
        if not self.per_call:
            raise RuntimeError("call_sq_norms needs ActNormCollector(..., per_call=True)")
        return {name: torch.stack(rows) for name, rows in self._calls.items()}

    def norms(self) -> dict[str, torch.Tensor]:
        """``{name: (in_features,) float32}``: ``||X_j||_2``, the square root of the sums.

        Modules that saw no input yet are absent.
        """
        return {name: sq.sqrt() for name, sq in self.sq_norms().items()}

    def num_tokens(self) -> dict[str, int]:
        """``{name: tokens seen}``, counted from shapes (no device sync)."""
        return dict(self._tokens)

    def reset(self) -> None:
        """Forget the accumulated sums (the hooks stay as they are)."""
        self._sq.clear()
        self._calls.clear()
        self._tokens.clear()


def _included(include, name: str, module: nn.Module) -> bool:
    if include is None:
        return True
    if callable(include):
        return bool(include(name, module))
    if isinstance(include, str):
        include = [include]
    return any(fnmatch.fnmatchcase(name, pat) for pat in include)
