"""Input-channel permutations for N:M sparsity, and folding them into the model.

N:M keeps N of every M *consecutive* inputs, so which channels share a group matters:
a group of four important channels must lose two of them. Permuting a layer's input
channels first gives each group a better mix (RIA, Zhang et al. 2024, "channel
reallocation" + linear sum assignment):

1. reallocation: channels sorted by total score; the M positions of each group take
   one channel from each of M bands of that order (alternately ascending and
   descending), so every group mixes strong and weak channels;
2. assignment: for each position in turn, the channels in that position are
   reassigned to the groups by a linear sum assignment (``scipy``) that maximises the
   kept score, the other positions fixed. Adding channel c to a group whose other
   channels are fixed keeps, in row i, ``const + max(0, S[i, c] - t[i, g])``, with
   ``t[i, g]`` the N-th largest of the fixed ones, so the gain table is exact.

Each step is kept only if it raises the total kept score. The search keeps the scores
as M planes ``(rows, groups)``, one per group position, and their order per group (a
sorting network of elementwise max/min): one step moves one plane's columns, and the
order gives both the kept score and every ``t`` (3.3x faster at 4:8 than ``topk`` over
groups of 8 on a 2-core Xeon; :func:`wanda_kernels.reference.nm_permutation` writes the
search out).

The permutation must hold at inference. Where the input is the output of other linear
layers through an elementwise function it is *folded* (exact, no runtime cost):
``down_proj``'s inputs are the rows of ``gate_proj`` and ``up_proj``, and ``o_proj``'s
inputs are ``v_proj``'s rows within each head (one permutation of the head dimension,
shared by every head). Everywhere else (``q/k/v_proj``, ``gate/up_proj``) the layer
keeps its weight in the original order, its N:M groups hold in the permuted order,
and ``SparseLinear`` gathers its input once per call; the layers that read the same
input share one permutation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .. import _torch_impl
from ..prune import score_terms

__all__ = ["Fold", "FOLDS", "score_matrix", "kept_score", "nm_permutation", "head_permutation", "fold_"]


@dataclass(frozen=True)
class Fold:
    """A consumer linear whose input channels are the output rows of its producers, elementwise.

    ``per_head``: the channels are heads x head_dim and only a permutation of the head
    dimension, the same for every head, is exact (attention mixes tokens per head).
    """

    consumer: str
    producers: tuple[str, ...]
    per_head: bool = False


# Names inside a decoder layer (the LLaMA family: LLaMA, Mistral, Qwen2, SmolLM2...).
# A layer without these names gets the gather in SparseLinear instead.
FOLDS = (
    Fold("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),
    Fold("self_attn.o_proj", ("self_attn.v_proj",), per_head=True),
)


def score_matrix(weight: torch.Tensor, norms: torch.Tensor, metric: str) -> torch.Tensor:
    """The fp32 ``(out, in)`` scores the mask will rank for ``metric``, from ``prune.score_terms`` as ``prune_``'s."""
    return _torch_impl.score_keys(weight, *score_terms(weight, norms.float().abs().contiguous(), metric)
                                  ).view(torch.float32)


@functools.cache
def _sorting_network(m: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``m`` inputs: comparators ``(a, b)``, ``a < b``.

    Built for the next power of two; the comparators that touch a position ``>= m`` are
    dropped, which is exact: padded with -inf there, those positions never change.
    """
    size = 1 << max(0, m - 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(k):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < m:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _ranked(planes: list[torch.Tensor]) -> list[torch.Tensor]:
    """``planes`` sorted elementwise, largest first (``len(planes)`` tensors of one shape).

    A sorting network of elementwise max/min: for groups of 4 or 8, 8-11x faster than
    ``topk`` over a last dimension that short (SmolLM2's layer shapes, 2-core Xeon).
    """
    out = list(planes)
    for a, b in _sorting_network(len(out)):
        out[a], out[b] = torch.maximum(out[a], out[b]), torch.minimum(out[a], out[b])
    return out


@dataclass(frozen=True)
class _Grouping:
    """The scores under one permutation, by position in the N:M groups.

    ``planes[p][i, g]``: row ``i``'s score of the channel at position ``p`` of group ``g``
    (``m`` tensors ``(rows, groups)`` fp32); ``ranked``: the same sorted per row and group,
    largest first; ``kept``: the sum of the N largest of every group (fp64).
    """

    perm: torch.Tensor
    planes: list[torch.Tensor]
    ranked: list[torch.Tensor]
    kept: float


def _grouping(perm: torch.Tensor, planes: list[torch.Tensor], n: int) -> _Grouping:
    ranked = _ranked(planes)
    kept = torch.stack([r.sum(dtype=torch.float64) for r in ranked[:n]]).sum()
    return _Grouping(perm, planes, ranked, float(kept))


def _group(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> _Grouping:
    rows, cols = scores.shape
    planes = scores[:, perm].reshape(rows, cols // m, m).permute(2, 0, 1).contiguous()
    return _grouping(perm, list(planes.unbind(0)), n)


def kept_score(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """The sum of the scores N:M keeps with the columns in ``perm``'s order (fp64)."""
    if perm is None:
        perm = torch.arange(scores.shape[1], device=scores.device)
    return _group(scores, perm, n, m).kept


def _reallocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    cols = scores.shape[1]
    order = scores.double().sum(dim=0).argsort(stable=True)  # weakest channel first
    perm = torch.empty_like(order)
    band = cols // m
    for slot in range(m):
        part = order[slot * band : (slot + 1) * band]
        perm[slot::m] = part if slot % 2 == 0 else part.flip(0)
    return perm


def _gain_table(cand: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``gain[k, g] = sum_i max(0, cand[k, i] - t[g, i])`` ``(groups, groups)`` fp64 on the CPU.

    ``cand`` and ``t`` are ``(groups, rows)``, on one device: rows last, so the sums run
    over contiguous memory. Candidates go in chunks: on a CPU each temporary stays about
    1 MiB, in cache (twice as fast as 16 MiB chunks on a 2-core Xeon); on a GPU chunks are
    large, so that a table takes few launches.
    """
    groups, rows = t.shape
    gain = torch.empty(groups, groups, dtype=torch.float64, device=t.device)
    budget = 1 << 18 if t.device.type == "cpu" else 1 << 24
    chunk = max(1, budget // max(1, rows * groups))
    for lo in range(0, groups, chunk):
        c = cand[lo : lo + chunk]
        gain[lo : lo + chunk] = (c[:, None, :] - t[None, :, :]).clamp_min_(0).sum(dim=2)
    return gain.cpu()


def _assignment_step(grouping: _Grouping, n: int, slot: int) -> _Grouping | None:
    """The best reassignment of the channels at position ``slot`` to the groups, the other positions fixed.

    None when the best is to leave every channel where it is.
    """
    from scipy.optimize import linear_sum_assignment

    m = len(grouping.planes)
    here = grouping.planes[slot]  # (rows, groups)
    # t[i, g]: the N-th largest of group g's other M - 1 scores in row i (N <= M - 1).
    # Taking out a score at or above the group's N-th largest moves the (N+1)-th up.
    nth = grouping.ranked[n - 1]
    t = torch.where(here >= nth, grouping.ranked[n], nth)
    gain = _gain_table(here.t().contiguous(), t.t().contiguous())
    _, to_group = linear_sum_assignment(gain.numpy(), maximize=True)  # channel k -> group to_group[k]
    in_place = torch.arange(len(to_group), device=here.device)
    source = torch.empty_like(in_place)
    source[torch.as_tensor(to_group, device=here.device)] = in_place  # group g <- channel source[g]
    if torch.equal(source, in_place):
        return None
    planes = list(grouping.planes)
    planes[slot] = here[:, source]
    perm = grouping.perm.clone()
    perm[slot::m] = grouping.perm[slot::m][source]
    return _grouping(perm, planes, n)


@torch.no_grad()
def nm_permutation(scores: torch.Tensor, n: int, m: int, *, rounds: int = 1) -> torch.Tensor:
    """An input permutation ``perm`` ``(in,)`` int64 under which N:M keeps more of ``scores``.

    Args:
        scores: ``(rows, in)`` fp32, ``in % m == 0`` (stack the scores of the layers
            that share the input).
        n, m: the pattern.
        rounds: passes of the assignment over the M positions.

    Returns:
        ``perm`` on ``scores.device``: column ``k`` of the permuted layer is input
        ``perm[k]``. The identity if nothing beats it.
    """
    cols = scores.shape[1]
    best = _group(scores, torch.arange(cols, device=scores.device), n, m)
    candidate = _group(scores, _reallocation(scores, m), n, m)
    if candidate.kept > best.kept:
        best = candidate
    for _ in range(rounds):
        for slot in range(m):
            candidate = _assignment_step(best, n, slot)
            if candidate is not None and candidate.kept > best.kept:
                best = candidate
    return best.perm


def head_permutation(perm_head: torch.Tensor, channels: int) -> torch.Tensor:
    """The permutation of ``channels = heads * head_dim`` that applies ``perm_head`` inside every head."""
    d = perm_head.numel()
    base = torch.arange(0, channels, d, device=perm_head.device)
    return (base[:, None] + perm_head[None, :]).reshape(-1)


@torch.no_grad()
def fold_(consumer: nn.Linear, producers: list[nn.Linear], perm: torch.Tensor, head_dim: int | None = None) -> None:
    """Permute ``consumer``'s input columns by ``perm`` and its producers' output rows to match, in place.

    ``perm`` is ``(consumer.in_features,)``; with ``head_dim`` it is a permutation of the
    head dimension (``(head_dim,)``), applied in every head of the consumer and of each
    producer (whose heads may be fewer: grouped-query attention). The model computes
    the same function afterwards.
    """
    full = perm if head_dim is None else head_permutation(perm, consumer.in_features)
    consumer.weight.data = consumer.weight.data[:, full].contiguous()
    for producer in producers:
        rows = perm if head_dim is None else head_permutation(perm, producer.out_features)
        producer.weight.data = producer.weight.data[rows].contiguous()
        if producer.bias is not None:
            producer.bias.data = producer.bias.data[rows].contiguous()
