"""BitmapLinear: a drop-in nn.Linear whose unstructured-sparse weight is stored in the bitmap format.

The weight is kept as ``values`` (the kept weights of every row) plus a bit per weight
(:mod:`wanda_kernels.bitmap`): 0.5625 of the dense bytes at 50% sparsity. ``forward``
runs the Triton kernel on CUDA (``kernels/bitmap_matmul.py``), which reads only those
bytes, and ``F.linear`` on the decompressed weight elsewhere (same products, one
warning that says why).
"""

from __future__ import annotations

import torch
from torch import nn

from ._linear_like import is_linear_like, linear_weight
from ._validation import BACKENDS, check_choice, check_positive_int
from .bitmap import (
    DTYPES_BITMAP,
    bitmap_mask,
    bitmap_nbytes,
    bitmap_words,
    check_bitmap_data,
    chunk_offsets,
    compress_bitmap,
    decompress_bitmap,
)
from .bitmap_op import dense_linear, fallback_reason, implementation, kernel_linear  # registers the op

__all__ = ["BitmapLinear"]

_BUFFERS = ("values", "bitmap", "row_offsets", "bias", "chunks")


class _Refused(Exception):
    """torch recorded a loading error for this module (it raises them all at the end)."""


class BitmapLinear(nn.Module):
    """``y = x W^T + b`` with W in the bitmap format.

    Buffers (all on one device): ``values`` float16/bfloat16, ``(out_features, nnz_row)``
    when every row keeps the same number of weights, else ``(nnz,)`` with ``row_offsets
    (out_features + 1,)`` int64 (None otherwise); ``bitmap (out_features, ceil(in_features
    / 32))`` int32; ``bias (out_features,)`` or None; and, derived and not saved,
    ``chunks``, the chunk offset table the kernel starts its K splits from.

    ``state_dict`` holds ``values``, ``bitmap``, ``bias`` and ``row_offsets`` when there
    is one. Their sizes depend on the weight, so ``load_state_dict`` takes the sizes it
    is given (a fresh ``BitmapLinear(in, out)`` loads any checkpoint of that shape),
    checks the data (bits against counts) and leaves the module unchanged when it fails.

    Build one with :meth:`from_linear` or :meth:`from_dense`. ``forward`` takes
    ``x (..., in_features)`` of the weight's dtype and returns ``(..., out_features)``.
    ``backend``: ``"auto"`` (Triton on CUDA, dense elsewhere), ``"triton"`` or ``"torch"``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float16, device=None, backend: str = "auto"):
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if dtype not in DTYPES_BITMAP:
            raise TypeError(f"BitmapLinear stores float16 or bfloat16 weights; got dtype={dtype}")
        self.in_features, self.out_features = in_features, out_features
        # An all-pruned weight until something is loaded or built.
        self.register_buffer("values", torch.zeros(out_features, 0, dtype=dtype, device=device))
        self.register_buffer("bitmap", torch.zeros(out_features, bitmap_words(in_features), dtype=torch.int32,
                                                   device=device))
        self.register_buffer("row_offsets", None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("chunks", chunk_offsets(self.bitmap, self.values), persistent=False)
        self.backend = backend

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   *, backend: str = "auto") -> BitmapLinear:
        """From a weight ``(out, in)`` float16/bfloat16, an optional bias ``(out,)`` and keep-mask.

        ``mask`` (bool, the weight's shape and device): the weights to keep, zeros
        included (so that rows keep equal counts); None: :func:`~wanda_kernels.bitmap.nonzero_mask`
        (the non-zeros, short rows padded with kept zeros where that is smaller).
        """
        values, bitmap, row_offsets = compress_bitmap(weight, mask)  # checks weight and mask
        out_features, in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({out_features},); got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        module = cls(in_features, out_features, bias is not None, dtype=weight.dtype, device=weight.device,
                     backend=backend)
        module.values, module.bitmap, module.row_offsets = values, bitmap, row_offsets
        if bias is not None:
            module.bias = bias.detach().to(weight.dtype).clone()
        module.chunks = chunk_offsets(bitmap, values, row_offsets)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, mask: torch.Tensor | None = None, *,
                    backend: str = "auto") -> BitmapLinear:
        """From an ``nn.Linear`` (float16/bfloat16) whose pruned weights are zeros, or with its keep-mask.

        Also from transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``:
        ``mask`` is then ``(out, in)``, like the module's outputs and inputs.
        """
        if not is_linear_like(linear):
            raise TypeError(f"linear must be an nn.Linear (or transformers' Conv1D); got {type(linear).__name__}")
        return cls.from_dense(linear_weight(linear), linear.bias, mask, backend=backend)

    # -- what runs ----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_choice("backend", value, BACKENDS)
        self._backend = value
        self._choose()

    def _choose(self) -> None:
        """Decide once (at construction, after moves, loads and backend changes) whether
        ``forward`` may call the kernel directly; raises here if ``backend="triton"`` cannot run."""
        self._direct = (implementation(self._backend, self.values.device) == "triton"
                        and self.values.dtype in DTYPES_BITMAP)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._choose()
        return result

    def __setstate__(self, state):
        super().__setstate__(state)
        self._choose()

    def kernel(self) -> str:
        """What ``forward`` runs on this module's device."""
        if self._direct:
            return "triton bitmap"
        if self._backend == "torch":
            return "dense F.linear (backend='torch')"
        return f"dense fallback ({fallback_reason(self.values.device) or 'values are ' + str(self.values.dtype)})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in_features)`` of the weight's dtype, on its device -> ``(..., out_features)``.

        Eager on CUDA it calls the kernel directly; under ``torch.compile``, with autograd
        recording or for tensor subclasses it goes through the op
        ``torch.ops.wanda_kernels.bitmap_linear``. No host synchronisation on either path.
        """
        values = self.values
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BitmapLinear expects input (..., {self.in_features}); got {tuple(x.shape)}")
        if x.dtype != values.dtype:
            raise TypeError(f"BitmapLinear holds {values.dtype} weights; got input of {x.dtype}")
        if x.device != values.device:
            raise ValueError(f"input is on {x.device} but BitmapLinear is on {values.device}")
        if (self._direct and type(x) is torch.Tensor and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling()):
            return kernel_linear(x, values, self.bitmap, self.chunks, self.bias)
        if values.dtype not in DTYPES_BITMAP:  # converted with .float() / .double(): dense, in that dtype
            return dense_linear(x, values, self.bitmap, self.bias)
        return torch.ops.wanda_kernels.bitmap_linear(x, values, self.bitmap, self.chunks, self.bias, self._backend)

    # -- the weight ---------------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight (zeros where pruned)."""
        return decompress_bitmap(self.values, self.bitmap, self.in_features, self.row_offsets)

    def mask(self) -> torch.Tensor:
        """The keep-mask ``(out_features, in_features)`` bool."""
        return bitmap_mask(self.bitmap, self.in_features)

    @property
    def nnz(self) -> int:
        """Stored (kept) weights."""
        return self.values.numel()

    def nbytes(self) -> int:
        """Bytes of the stored weight (values, bitmap, row offsets; not the bias)."""
        return bitmap_nbytes(self.values, self.bitmap, self.row_offsets)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The sizes of values (and whether row_offsets exists) depend on the weight: take
        # them from the incoming tensors, load, check the data; on any failure put back
        # what was there.
        saved = {name: self._buffers[name] for name in _BUFFERS}
        # Fresh tensors receive the copies, so the old ones are intact if anything fails.
        def incoming(name):
            tensor = state_dict.get(prefix + name)
            return tensor if isinstance(tensor, torch.Tensor) else None

        for name in ("bitmap", "bias"):
            if saved[name] is not None and incoming(name) is not None:
                self._buffers[name] = torch.empty_like(saved[name])
        values = incoming("values")
        if values is not None:
            shape = values.shape if values.dim() in (1, 2) else self.values.shape  # else torch reports the shape
            self.values = torch.empty(shape, dtype=self.values.dtype, device=self.values.device)
            offsets = incoming("row_offsets")
            self.row_offsets = (None if offsets is None else
                                torch.empty(offsets.shape, dtype=torch.int64, device=self.bitmap.device))
        errors_before = len(error_msgs)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if len(error_msgs) > errors_before:  # a wrong shape or dtype: load_state_dict raises with it
                raise _Refused
            if prefix + "values" in state_dict and prefix + "bitmap" in state_dict:
                try:
                    check_bitmap_data(self.values, self.bitmap, self.in_features, self.row_offsets)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"BitmapLinear {prefix.rstrip('.') or '(root)'}: {exc}") from None
            self.chunks = chunk_offsets(self.bitmap, self.values, self.row_offsets)
        except BaseException as exc:
            for name, tensor in saved.items():
                self._buffers[name] = tensor
            if not isinstance(exc, _Refused):
                raise

    def extra_repr(self) -> str:
        rows = f"nnz_row={self.values.shape[1]}" if self.row_offsets is None else "unequal rows"
        dense_bytes = self.out_features * self.in_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}, nnz={self.nnz} ({rows}), "
                f"{self.nbytes() / dense_bytes:.4f} of dense bytes, kernel={self.kernel()}")
