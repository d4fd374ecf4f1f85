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

Each step is kept only if it raises the total kept score.

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


def kept_score(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """The sum of the scores N:M keeps with the columns in ``perm``'s order (fp64)."""
    s = scores if perm is None else scores[:, perm]
    rows, cols = s.shape
    return float(s.reshape(rows, cols // m, m).double().topk(n, dim=-1).values.sum())


def _reallocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    cols = scores.shape[1]
    order = scores.double().sum(dim=0).argsort(stable=True)  # weakest channel first
    perm = torch.empty_like(order)
    band = cols // m
    for slot in range(m):
        part = order[slot * band : (slot + 1) * band]
        perm[slot::m] = part if slot % 2 == 0 else part.flip(0)
    return perm


def _assignment_step(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, slot: int) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    groups = cols // m
    s = scores[:, perm].reshape(rows, groups, m)
    others = torch.cat([s[:, :, :slot], s[:, :, slot + 1 :]], dim=2)  # (rows, groups, m - 1)
    # t[i, g]: the N-th largest of the fixed channels (N <= M - 1); the candidate only
    # counts by how much it beats it.
    t = others.topk(n, dim=2).values[:, :, n - 1]  # (rows, groups)
    cand = s[:, :, slot].t().contiguous()  # (channels in this slot, rows)
    t = t.t().contiguous()  # (groups, rows): rows last, so the sums run over contiguous memory
    gain = torch.empty(groups, groups, dtype=torch.float64)
    chunk = max(1, (1 << 22) // max(1, rows * groups))
    for lo in range(0, groups, chunk):
        c = cand[lo : lo + chunk]
        gain[lo : lo + chunk] = (c[:, None, :] - t[None, :, :]).clamp_min_(0).sum(dim=2).double().cpu()
    chosen, to_group = linear_sum_assignment(gain.numpy(), maximize=True)
    slot_channels = perm[slot::m].clone()
    new = perm.clone()
    new[torch.as_tensor(to_group, device=perm.device) * m + slot] = slot_channels[torch.as_tensor(chosen,
                                                                                                  device=perm.device)]
    return new


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
    best = torch.arange(cols, device=scores.device)
    best_score = kept_score(scores, n, m, best)
    candidate = _reallocation(scores, m)
    if (s := kept_score(scores, n, m, candidate)) > best_score:
        best, best_score = candidate, s
    for _ in range(rounds):
        for slot in range(m):
            candidate = _assignment_step(scores, best, n, m, slot)
            if (s := kept_score(scores, n, m, candidate)) > best_score:
                best, best_score = candidate, s
    return best


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
