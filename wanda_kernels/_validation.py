"""Argument checks shared by the public functions.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind,
wrong value) with the argument's name and the value received, and none of them
touches tensor data except :func:`check_score_inputs`, which reads the weight and the
norms back (once) to reject non-finite weights and negative or non-finite norms.
"""

from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction

import torch

PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_M = 32
METRICS = ("wanda", "magnitude", "ria")
FUSED_24_METRICS = ("wanda", "magnitude")  # the metrics prune_compress_24 fuses
BACKENDS = ("auto", "triton", "torch")
SCOPES = ("row", "layer")
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a comparison group prunes: ``floor(sparsity * numel)``.

    The product is taken in exact decimal arithmetic of the sparsity as Python prints
    it, so ``num_pruned(100, 0.29) == 29`` even though ``0.29 * 100`` is
    ``28.999999999999996`` in binary floating point.
    """
    return math.floor(Fraction(repr(float(sparsity))) * numel)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def parse_pattern(pattern) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"N:M"`` -> ``(N, M)`` with ``1 <= N < M <= 32``."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str such as 'unstructured' or '2:4'; got {pattern!r}")
    if pattern == "unstructured":
        return None
    match = PATTERN_RE.match(pattern)
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8'); got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"pattern {pattern!r}: need 1 <= N < M (N kept of every M); got N={n}, M={m}")
    if m > MAX_M:
        raise ValueError(f"pattern {pattern!r}: M must be at most {MAX_M}; got M={m}")
    return n, m


def check_sparsity(sparsity, nm: tuple[int, int] | None) -> float:
    """Validate ``sparsity`` and return the effective value (``None`` -> the default)."""
    if nm is not None:
        n, m = nm
        implied = 1.0 - n / m
        if sparsity is None:
            return implied
        value = _sparsity_value(sparsity)
        if not math.isclose(value, implied, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(
                f"sparsity={sparsity!r} contradicts pattern '{n}:{m}', which prunes 1 - {n}/{m} = {implied:g}; "
                "leave sparsity unset with an N:M pattern"
            )
        return implied
    if sparsity is None:
        return 0.5
    value = _sparsity_value(sparsity)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity!r}")
    return value


def _sparsity_value(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a real number in [0, 1); got {sparsity!r} ({type(sparsity).__name__})")
    value = float(sparsity)
    if math.isnan(value):
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity!r}")
    return value


def check_weight(weight, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or nn.Linear; got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features); "
                         f"got {weight.dim()}-D tensor of shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {weight.dtype}")
    if weight.is_sparse or weight.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {weight.layout}")
    return weight


def check_score_inputs(weight: torch.Tensor, norms, metric: str) -> torch.Tensor | None:
    """Validate the data a score is computed from: ``norms`` against ``weight``, and both values.

    The weight must be finite (a NaN or Inf has no place in a ranking, and a row that
    keeps one turns every output it feeds into NaN); the norms finite and non-negative.
    Both are read back in one host transfer. Returns the norms as fp32 contiguous on the
    weight's device (None when ``norms`` is None and the metric allows it).
    """
    norms32 = None
    if norms is None:
        if metric != "magnitude":
            raise ValueError(f"norms is None, but metric={metric!r} needs ||X_j||_2 per input feature; "
                             "collect them with ActNormCollector or pass metric='magnitude'")
    else:
        if not isinstance(norms, torch.Tensor):
            raise TypeError(f"norms must be a torch.Tensor of shape ({weight.shape[1]},); got {type(norms).__name__}")
        if tuple(norms.shape) != (weight.shape[1],):
            raise ValueError(
                f"norms must have shape (in_features,) = ({weight.shape[1]},) for weight of shape "
                f"{tuple(weight.shape)}; got {tuple(norms.shape)}"
            )
        if not norms.is_floating_point():
            raise TypeError(f"norms must be a floating tensor; got {norms.dtype}")
        if norms.device != weight.device:
            raise ValueError(f"norms is on {norms.device} but the weight is on {weight.device}; move one of them")
        norms32 = norms.detach().to(torch.float32)
    weight_ok = torch.isfinite(weight.detach()).all()
    norms_bad = (~torch.isfinite(norms32) | (norms32 < 0)) if norms32 is not None else None
    flags = torch.stack([weight_ok, norms_bad.any() if norms_bad is not None else weight_ok.new_tensor(False)])
    weight_ok, any_norm_bad = flags.tolist()  # the one host read
    if not weight_ok:
        row, col = (int(v) for v in (~torch.isfinite(weight.detach())).nonzero()[0])
        raise ValueError(f"weight has non-finite values: weight[{row}, {col}] = {float(weight[row, col])!r}; "
                         "pruning ranks weights by score, and NaN or Inf has no rank. Fix the weights (an "
                         "overflow in fp16? a diverged training run?) before pruning")
    if any_norm_bad:
        j = int(norms_bad.nonzero()[0, 0])
        raise ValueError(f"norms must be finite and non-negative; got norms[{j}] = {float(norms32[j])!r}")
    if norms32 is None:
        return None
    # +0.0 for -0.0, so that score bit patterns order like the scores themselves.
    return norms32.abs().contiguous()


def check_bias(bias, out_features: int, x: torch.Tensor) -> None:
    """A GEMM op's ``bias``: None, or ``(out_features,)`` of ``x``'s dtype (ValueError/TypeError naming it)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a tensor of shape ({out_features},); got {shape}")
    if bias.dtype != x.dtype:
        raise TypeError(f"bias is {bias.dtype} but x is {x.dtype}: the bias must have the input's dtype")


def check_permutation(perm, n: int, name: str = "perm") -> torch.Tensor:
    """``perm`` as int64: ValueError/TypeError unless it is a 1-D permutation of ``range(n)`` (one host read)."""
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64) or perm.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int64 tensor (a permutation of the {n} inputs); got "
                        f"{getattr(perm, 'dtype', type(perm).__name__)} {tuple(getattr(perm, 'shape', ()))}")
    if perm.numel() != n or not torch.equal(perm.sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"{name} must be a permutation of range({n}) (every input once); got {perm.numel()} "
                         "entries that are not")
    return perm.to(torch.int64)


def check_divisible(in_features: int, nm: tuple[int, int] | None, what: str = "weight") -> None:
    if nm is not None and in_features % nm[1] != 0:
        raise ValueError(
            f"pattern '{nm[0]}:{nm[1]}' needs in_features divisible by {nm[1]}; {what} has in_features={in_features}"
        )
