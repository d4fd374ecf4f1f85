"""SparseLinear: a drop-in nn.Linear whose 2:4 weight runs on sparse tensor cores.

``forward`` calls the custom op ``torch.ops.wanda_kernels.sparse24_linear``
(:mod:`wanda_kernels.gemm24`), which runs the CUTLASS sm90a kernel on compute
capability 9.0, the sm80 kernel on 8.x, and otherwise ``F.linear`` on the decompressed
weight, with one warning that says why.

A ``SparseLinear`` keeps one ``values`` tensor (the same for both kernels) and its
metadata in the layout of the kernel that will run on its device: it converts when it
is moved (``.to``, ``.cuda``) or loaded. Its ``state_dict`` always holds the sm80
layout, which is also PyTorch's, so checkpoints move between GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layout24 import DTYPES_24, META_FORMATS, filled_meta
from ._linear_like import is_linear_like, linear_weight
from ._validation import check_choice, check_permutation
from .gemm24 import policy
from .gemm24.op import (
    kernel_linear,
    sparse24_linear,  # noqa: F401  (registers torch.ops.wanda_kernels.sparse24_linear)
)
from .sparse24 import (
    compress_24,
    decompress_24,
    meta_sm80_to_sm90,
    meta_sm90_to_sm80,
    padded_shape,
)

__all__ = ["SparseLinear"]

_KERNEL_NAMES = {"sm90": "cutlass-sm90a (wgmma.sp)", "sm80": "cutlass-sm80 (mma.sp)"}


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W stored 2:4-compressed (CUTLASS format).

    Buffers: ``values`` ``(M, K/2)``, ``meta`` int16, ``bias`` ``(out_features,)`` or
    None, and ``perm`` ``(in_features,)`` int64 or None (an N:M channel permutation: the
    stored weight's input order, gathered from ``x`` in ``forward``), where ``M`` and ``K``
    are ``out_features`` and ``in_features`` rounded up to multiples of 32 and 64 (the
    kernels' granularity; the padding is zeros and invisible from outside). ``meta`` is in
    the layout ``meta_format`` names: ``"sm80"``, ``(M, K/16)``, or on a compute
    capability 9.0 GPU with the sm90a kernels built, ``"sm90"``, ``meta_shape(M, K, "sm90")``.
    ``state_dict`` always stores ``"sm80"``.

    Build one with :meth:`from_linear` or :meth:`from_dense`. ``forward`` takes
    ``x (..., in_features)`` of the weight's dtype and returns ``(..., out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float16, device=None, permuted: bool = False):
        super().__init__()
        m, k = padded_shape(out_features, in_features)
        if dtype not in DTYPES_24:
            raise TypeError(f"SparseLinear stores float16 or bfloat16 weights; got dtype={dtype}")
        self.in_features, self.out_features = in_features, out_features
        device = torch.empty(0, device=device).device
        # An all-zero weight, straight in the layout of the kernel that will run here.
        self.meta_format = policy.meta_format_for(device, dtype)
        self.register_buffer("values", torch.zeros(m, k // 2, dtype=dtype, device=device))
        self.register_buffer("meta", filled_meta(m, k, self.meta_format, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # permuted: the weight's N:M groups hold with the inputs in this order (an N:M
        # channel permutation, wanda_kernels.llm.permute); forward gathers x once.
        self.register_buffer("perm", torch.arange(in_features, device=device) if permuted else None)
        self._sync_meta_format()  # the layout is already right: this picks the kernel

    # -- metadata layout follows the device ---------------------------------------------

    def meta_as(self, meta_format: str) -> torch.Tensor:
        """The metadata in ``meta_format`` (``"sm80"`` or ``"sm90"``): the buffer itself when it already is."""
        check_choice("meta_format", meta_format, META_FORMATS)
        if meta_format == self.meta_format:
            return self.meta
        m, k = self.values.shape[0], 2 * self.values.shape[1]
        convert = meta_sm80_to_sm90 if meta_format == "sm90" else meta_sm90_to_sm80
        return convert(self.meta, m, k)

    def _sync_meta_format(self) -> None:
        """Put ``meta`` in the layout of the kernel that will run on the module's device, and pick that kernel.

        Runs at construction, after every move (``.to``, ``.cuda``, ``.half``), after
        ``load_state_dict`` and after unpickling: the only times the device, dtype or layout
        can change. So ``forward`` decides nothing per call.
        """
        target = policy.meta_format_for(self.values.device, self.values.dtype)
        if target != self.meta_format:
            self.meta = self.meta_as(target)
            self.meta_format = target
        self._kernel_fn = kernel_linear(self.values.device, self.values.dtype, self.meta_format)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .cpu(), .half() ... all end here; convert after the move.
        result = super()._apply(fn, *args, **kwargs)
        self._sync_meta_format()
        return result

    def __setstate__(self, state):
        # Unpickled (torch.load of a whole module, possibly with map_location): the layout
        # and kernel chosen where it was saved may not be this device's; choose again.
        super().__setstate__(state)
        self._sync_meta_format()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.meta_format != "sm80":  # checkpoints hold the portable (PyTorch) layout
            destination[prefix + "meta"] = self.meta_as("sm80").detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        perm = state_dict.get(prefix + "perm")
        if perm is not None and self.perm is not None:  # refused before anything is loaded
            check_permutation(perm, self.in_features, name=f"{prefix}perm")
        # The incoming meta is sm80: load into an sm80 buffer, then convert for the device.
        if self.meta_format != "sm80":
            self.meta = self.meta_as("sm80")
            self.meta_format = "sm80"
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._sync_meta_format()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   perm: torch.Tensor | None = None) -> SparseLinear:
        """From a 2:4 sparse weight ``(out, in)`` float16/bfloat16 and an optional bias ``(out,)``.

        ``perm``: an ``(in,)`` integer permutation of the inputs (on any device) under which
        the weight is 2:4 (``weight[:, perm]`` is); the module then stores that and
        gathers ``x[..., perm]`` in ``forward``, so its outputs equal ``x @ weight.T``.

        Raises ValueError naming the first row and group that is not 2:4, or a ``perm``
        that is not a permutation of ``range(in_features)``.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor (out_features, in_features); got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.dtype not in DTYPES_24:
            raise TypeError(f"SparseLinear stores float16 or bfloat16 weights; got {weight.dtype}. "
                            "Convert the model first, e.g. model.half() or model.to(torch.bfloat16)")
        out_features, in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({out_features},); got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        weight = weight.detach()
        if in_features % 4:  # the padding would complete the last group: refuse here
            raise ValueError(f"weight has in_features={in_features}, not a multiple of 4: it cannot be 2:4 sparse")
        if perm is not None:
            perm = check_permutation(perm, in_features).to(weight.device)
            weight = weight[:, perm]
        module = cls(in_features, out_features, bias is not None, dtype=weight.dtype, device=weight.device,
                     permuted=perm is not None)
        if perm is not None:
            module.perm = perm.clone()  # its own storage: checkpoints de-duplicate shared tensors
        m, k = module.values.shape[0], 2 * module.values.shape[1]
        padded = weight.new_zeros(m, k)
        padded[:out_features, :in_features] = weight
        # compress_24 checks the 2:4 pattern (the padding is zeros, so a bad group's row
        # and columns are the weight's own).
        module.values, module.meta = compress_24(padded, meta_format=module.meta_format)
        if bias is not None:
            module.bias = bias.detach().to(weight.dtype).clone()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, *, perm: torch.Tensor | None = None) -> SparseLinear:
        """From an ``nn.Linear`` whose weight is already 2:4 sparse (see ``prune_(..., pattern="2:4")``).

        Also from transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``:
        the module computes the same ``x @ W + b``.
        ``perm``: as :meth:`from_dense` (the order ``prune_model(..., permute=True)`` reports).
        """
        if not is_linear_like(linear):
            raise TypeError(f"linear must be an nn.Linear (or transformers' Conv1D); got {type(linear).__name__}")
        return cls.from_dense(linear_weight(linear), linear.bias, perm=perm)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, in the inputs' own order."""
        stored = decompress_24(self.values, self.meta, meta_format=self.meta_format)[
            : self.out_features, : self.in_features]
        if self.perm is None:
            return stored
        dense = torch.empty_like(stored)
        dense[:, self.perm] = stored
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in_features)`` of the weight's dtype, on its device -> ``(..., out_features)``.

        Eager, on a GPU with a kernel, it calls that kernel's function directly (picked when
        the module was built or moved; its operands are right by construction). Under
        ``torch.compile``, with autograd recording, or for tensor subclasses, it goes
        through the custom op ``torch.ops.wanda_kernels.sparse24_linear``, which also runs
        the dense fallback where no kernel does. Neither path reads data back to the host,
        so both can be captured in a CUDA graph.
        """
        values = self.values
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects input (..., {self.in_features}); got {tuple(x.shape)}")
        if x.dtype != values.dtype:
            raise TypeError(f"SparseLinear holds {values.dtype} weights; got input of {x.dtype}")
        if x.device != values.device:
            raise ValueError(f"input is on {x.device} but SparseLinear is on {values.device}")
        if self.perm is not None:
            x = x.index_select(-1, self.perm)  # the weight's input order
        fn = self._kernel_fn
        if (fn is not None and type(x) is torch.Tensor and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling()):
            return fn(x, values, self.meta, self.bias, self.out_features)
        return torch.ops.wanda_kernels.sparse24_linear(x, values, self.meta, self.bias, self.out_features,
                                                       self.meta_format)

    def kernel(self) -> str:
        """What ``forward`` runs for inputs on this module's device, e.g. ``"cutlass-sm90a (wgmma.sp)"``."""
        reason = policy.kernel_unavailable(self.values.device, self.values.dtype, self.meta_format)
        if reason is None:
            return _KERNEL_NAMES[self.meta_format]
        return f"dense fallback ({reason.split(';')[0]})"

    def extra_repr(self) -> str:
        padded = tuple(self.values.shape[:1]) + (2 * self.values.shape[1],)
        pad = "" if padded == (self.out_features, self.in_features) else f", padded={padded}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}{pad}, values={tuple(self.values.shape)}, meta={tuple(self.meta.shape)} "
                f"{self.meta_format}, {'permuted inputs, ' if self.perm is not None else ''}"
                f"kernel={self.kernel()}")
