"""Plain-torch twins of the public ops: the oracle of the test suite.

These functions *define* the semantics the fast paths must reproduce. They are written
for clarity, not speed (sorts where the kernels select, loops where they vectorise),
and they check nothing beyond what defines the semantics (a group of 4 with more than
two non-zeros has no stored pair). No product module imports this one; it imports the
product only for shared definitions: ``num_pruned`` (how many weights a row loses) and
the 2:4 layouts of ``wanda_kernels._layout24``, which two outside oracles pin
(PyTorch's packer and CUTLASS's own ``fill_layoutE``, see ``tests/``).

Twins: :func:`keep_mask` of ``prune_mask``, :func:`prune` of ``prune_``,
:func:`accumulate_sq_norms` of ``accumulate_sq_norms_``, :func:`compress_24` /
:func:`decompress_24` / :func:`decompress_24_sm90` / :func:`meta_sm80_to_sm90` of the
2:4 format functions, :func:`compress_bitmap` / :func:`decompress_bitmap` /
:func:`chunk_offsets` / :func:`bitmap_linear` of the bitmap format and its kernel, and
:func:`sequential_prune` of ``prune_model`` (Wanda and magnitude), :func:`nm_permutation`
/ :func:`nm_kept_score` of the N:M permutation search (``llm.permute``). The rest is checked
through these: ``prune_compress_24`` against ``prune`` then ``compress_24``,
``meta_sm90_to_sm80`` as the inverse of ``meta_sm80_to_sm90``, ``SparseLinear`` against
``F.linear`` on the decompressed weight, ``BitmapLinear`` against :func:`bitmap_linear`.

Semantics (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for
Large Language Models"):

* score ``S[i, j] = |W[i, j]| * ||X_j||_2`` computed in fp32 (``metric="wanda"``),
  or ``S[i, j] = |W[i, j]|`` (``metric="magnitude"``), or RIA's relative importance
  ``(|W[i, j]| / sum_k |W[i, k]| + |W[i, j]| / sum_k |W[k, j]|) * ||X_j||_2 ** 0.5``
  (``metric="ria"``, Zhang et al., "Plug-and-Play", ICLR 2024; here in fp64).
* unstructured, per row: every output row prunes exactly ``num_pruned(in, s)``
  weights, those with the lowest scores. Ties are broken by column index: among
  equal scores the lower column is pruned first (the order a stable ascending sort
  gives).
* N:M: in every group of M consecutive columns of a row the N highest scores are
  kept. Ties keep the lower column index.
* per layer (the magnitude baseline of the paper): one threshold over the whole
  matrix; ``num_pruned(out * in, s)`` weights are pruned, ties broken by the
  row-major flat index.
"""

from __future__ import annotations

import torch

from ._layout24 import FILL_CODE, sm80_offsets, sm90_offsets, to_int16
from ._validation import num_pruned

__all__ = [
    "num_pruned",
    "wanda_score",
    "magnitude_score",
    "ria_score",
    "unstructured_mask",
    "nm_mask",
    "layer_mask",
    "keep_mask",
    "prune",
    "accumulate_sq_norms",
    "pair_24",
    "compress_24",
    "decompress_24",
    "meta_codes_24",
    "meta_sm80_to_sm90",
    "decompress_24_sm90",
    "compress_bitmap",
    "decompress_bitmap",
    "bitmap_columns",
    "chunk_offsets",
    "bitmap_linear",
    "sequential_prune",
]


def wanda_score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda score ``|W| * norms[None, :]`` in fp32.

    Args:
        weight: ``(out_features, in_features)``, any floating dtype, any device.
        norms: ``(in_features,)``, ``||X_j||_2`` per input feature, same device.

    Returns:
        ``(out_features, in_features)`` fp32 on ``weight.device``.
    """
    return weight.abs().float() * norms.float()[None, :]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude score ``|W|`` in fp32, shape and device of ``weight``."""
    return weight.abs().float()


def ria_score(weight: torch.Tensor, norms: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA score, written as its paper writes it, in fp64.

    ``|W_ij| / sum_k |W_ik|`` (its share of row i) ``+ |W_ij| / sum_k |W_kj|`` (its share of
    column j), times ``norms_j ** power``; a zero weight scores 0.

    Args:
        weight: ``(out_features, in_features)`` floating; norms: ``(in_features,)``.

    Returns:
        ``(out_features, in_features)`` fp64 on ``weight.device``.
    """
    a = weight.abs().double()
    row = a.sum(dim=1, keepdim=True)
    col = a.sum(dim=0, keepdim=True)
    share = torch.where(a > 0, a / row + a / col, torch.zeros_like(a))
    return share * norms.double()[None, :] ** power


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row keep-mask: prune the ``num_pruned(in, sparsity)`` lowest scores of every row.

    Args:
        score: ``(rows, cols)`` floating scores.
        sparsity: fraction in ``[0, 1)``.

    Returns:
        ``(rows, cols)`` bool, True = kept.
    """
    k = num_pruned(score.shape[1], sparsity)
    order = torch.sort(score, dim=1, stable=True).indices  # ascending, ties by index
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: the ``n`` highest scores of every ``m`` consecutive columns of a row.

    Args:
        score: ``(rows, cols)`` floating scores, ``cols % m == 0``.
        n, m: ``1 <= n < m``.

    Returns:
        ``(rows, cols)`` bool, True = kept; exactly ``n`` True per group.
    """
    rows, cols = score.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    for start in range(0, cols, m):
        group = score[:, start : start + m]
        # A stable descending sort keeps the lower index first among equal scores.
        best = torch.sort(group, dim=1, descending=True, stable=True).indices[:, :n]
        keep[:, start : start + m].scatter_(1, best, True)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-layer keep-mask: one threshold over the whole matrix (the paper's magnitude baseline).

    Prunes the ``num_pruned(score.numel(), sparsity)`` lowest scores of the flattened
    (row-major) matrix, ties broken by flat index. Returns bool of ``score.shape``.
    """
    flat = score.reshape(1, -1)
    return unstructured_mask(flat, sparsity).reshape(score.shape)


def keep_mask(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    sparsity: float = 0.5,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    scope: str = "row",
) -> torch.Tensor:
    """Reference keep-mask of :func:`wanda_kernels.prune_mask` (same arguments, no checks).

    ``pattern`` is ``"unstructured"`` or ``"N:M"``; with N:M, ``sparsity`` is ignored.
    """
    if metric == "magnitude":
        score = magnitude_score(weight)
    elif metric == "ria":
        score = ria_score(weight, norms)
    else:
        score = wanda_score(weight, norms)
    if pattern != "unstructured":
        n, m = (int(v) for v in pattern.split(":"))
        return nm_mask(score, n, m)
    if sparsity is None:
        sparsity = 0.5
    if scope == "layer":
        return layer_mask(score, sparsity)
    return unstructured_mask(score, sparsity)


def prune(
    weight: torch.Tensor,
    norms: torch.Tensor | None,
    sparsity: float = 0.5,
    *,
    pattern: str = "unstructured",
    metric: str = "wanda",
    scope: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`wanda_kernels.prune_`, out of place.

    Returns ``(pruned_weight, keep)``: a copy of ``weight`` with pruned entries set to
    zero, and the bool keep-mask.
    """
    keep = keep_mask(weight, norms, sparsity, pattern=pattern, metric=metric, scope=scope)
    return weight.masked_fill(~keep, 0), keep


def accumulate_sq_norms(sq_norms: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`wanda_kernels.accumulate_sq_norms_`, out of place, in fp64.

    Args:
        sq_norms: ``(in_features,)`` running sums.
        x: ``(..., in_features)`` activations.

    Returns:
        ``(in_features,)`` fp64: ``sq_norms + sum over all tokens of x**2``.
    """
    x64 = x.double().reshape(-1, x.shape[-1])
    return sq_norms.double() + (x64 * x64).sum(dim=0)


# ---------------------------------------------------------------------------
# 2:4 compressed format (wanda_kernels/_layout24.py says where each layout puts what).


def pair_24(nonzero: tuple[bool, bool, bool, bool]) -> tuple[int, int]:
    """Positions ``(idx0, idx1)`` stored for a group of 4 with these non-zero flags.

    The non-zero positions, filled up (when fewer than two) with position 2, then 3:
    ``[x,0,0,0] -> (0,2)``, ``[0,x,0,0] -> (1,2)``, ``[0,0,x,0] -> (2,3)``,
    ``[0,0,0,x] -> (2,3)``, ``[0,0,0,0] -> (2,3)``. A group with more than two
    non-zeros is not 2:4 and has no pair (ValueError).
    """
    picked = [j for j in range(4) if nonzero[j]]
    if len(picked) > 2:
        raise ValueError(f"group {nonzero} has more than two non-zeros")
    for filler in (2, 3):
        if len(picked) < 2 and filler not in picked:
            picked.append(filler)
    idx0, idx1 = sorted(picked)
    return idx0, idx1


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`wanda_kernels.compress_24`: ``(M, K)`` 2:4 -> ``(values, meta)``.

    ``M % 32 == 0``, ``K % 64 == 0``, at most two non-zeros per group of 4.
    Returns values ``(M, K/2)`` in ``weight.dtype`` and meta ``(M, K/16)`` int16.
    """
    m, k = weight.shape
    groups = weight.reshape(m, k // 4, 4)
    flags = groups != 0
    pattern = flags[..., 0] * 1 + flags[..., 1] * 2 + flags[..., 2] * 4 + flags[..., 3] * 8
    lut = torch.tensor([pair_24(tuple(bool(p >> j & 1) for j in range(4))) if bin(p).count("1") <= 2
                        else (-1, -1) for p in range(16)])
    pairs = lut[pattern.cpu()].to(weight.device)  # (m, k/4, 2)
    if (pairs < 0).any():
        raise ValueError("weight is not 2:4 sparse")
    values = groups.gather(2, pairs).reshape(m, k // 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 2)).reshape(m, k // 16, 4)
    plain = codes[..., 0] | (codes[..., 1] << 4) | (codes[..., 2] << 8) | (codes[..., 3] << 12)
    meta = torch.empty(m * (k // 16), dtype=torch.int64, device=weight.device)
    meta[sm80_offsets(m, k // 16).reshape(-1).to(weight.device)] = plain.reshape(-1)
    return values, to_int16(meta).reshape(m, k // 16)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`wanda_kernels.decompress_24`: ``(values, meta)`` -> dense ``(M, K)``."""
    return _dense_from_codes(values, meta_codes_24(meta))


def _dense_from_codes(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Dense ``(M, K)`` from ``values (M, K/2)`` and the code ``idx0 | idx1 << 2`` of every group ``(M, K/4)``."""
    m, k = values.shape[0], 2 * values.shape[1]
    pairs = torch.stack([codes & 0x3, codes >> 2], dim=-1).to(values.device)  # (m, k/4, 2)
    dense = torch.zeros(m, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(2, pairs, values.reshape(m, k // 4, 2))
    return dense.reshape(m, k)


# ---------------------------------------------------------------------------
# The same 2:4 weight for Hopper's sparse wgmma (CUTLASS 3.x sm90 kernels): the same
# values, the same 4-bit codes at the places of sm90_offsets, padding groups 0xE.


def meta_codes_24(meta: torch.Tensor) -> torch.Tensor:
    """The 4-bit code of every group, ``(M, K/4)`` int64, from sm80 ``meta (M, K/16)``."""
    m, meta_cols = meta.shape
    offsets = sm80_offsets(m, meta_cols).to(meta.device)
    plain = meta.reshape(-1).long().bitwise_and(0xFFFF)[offsets.reshape(-1)].reshape(m, meta_cols)
    return torch.stack([(plain >> (4 * t)) & 0xF for t in range(4)], dim=-1).reshape(m, 4 * meta_cols)


def meta_sm80_to_sm90(meta: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`wanda_kernels.meta_sm80_to_sm90`: sm80 ``meta (M, K/16)`` -> E.

    Returns E as int16 ``(M64, K128 / 16)`` (its bytes in memory order; the shape is
    nominal), groups outside ``(M, K)`` filled with code 0xE.
    """
    m, k = meta.shape[0], 16 * meta.shape[1]
    codes = meta_codes_24(meta)
    offsets = sm90_offsets(m, k)
    nibbles = torch.full((offsets.numel(),), FILL_CODE, dtype=torch.int64)
    real = offsets[:m, : k // 4].reshape(-1) // 4  # nibble index: a group's 4 logical elements share a nibble
    nibbles[real] = codes.cpu().reshape(-1)
    e_bytes = nibbles[0::2] | (nibbles[1::2] << 4)  # low nibble first
    e16 = e_bytes[0::2] | (e_bytes[1::2] << 8)  # little-endian int16 view of the bytes
    return to_int16(e16).reshape(offsets.shape[0], offsets.shape[1] // 4).to(meta.device)


def decompress_24_sm90(values: torch.Tensor, meta_e: torch.Tensor) -> torch.Tensor:
    """Dense ``(M, K)`` from ``values (M, K/2)`` and sm90 metadata E (any 16-bit view of its bytes)."""
    m, k = values.shape[0], 2 * values.shape[1]
    e16 = meta_e.reshape(-1).long().bitwise_and(0xFFFF).cpu()
    e_bytes = torch.stack((e16 & 0xFF, e16 >> 8), dim=-1).reshape(-1)
    nibbles = torch.stack((e_bytes & 0xF, e_bytes >> 4), dim=-1).reshape(-1)
    offsets = sm90_offsets(m, k)[:m, : k // 4]
    return _dense_from_codes(values, nibbles[offsets // 4])

# ---------------------------------------------------------------------------
# The bitmap format for unstructured sparsity (wanda_kernels/bitmap.py), one row and one
# bit at a time.


def bitmap_nonzero_mask(weight: torch.Tensor) -> torch.Tensor:
    """The non-zeros; if padding every row with its first zeros up to the largest row's
    count costs at most the row offsets' ``8 (out + 1)`` bytes, those zeros too."""
    mask = weight != 0
    counts = [int(mask[i].sum()) for i in range(weight.shape[0])]
    top = max(counts)
    if sum(top - c for c in counts) * weight.element_size() > 8 * (weight.shape[0] + 1):
        return mask
    for i, c in enumerate(counts):
        zeros = [j for j in range(weight.shape[1]) if not bool(mask[i, j])]
        for j in zeros[: top - c]:
            mask[i, j] = True
    return mask


def compress_bitmap(weight: torch.Tensor, mask: torch.Tensor | None = None):
    """``(values, bitmap, row_offsets)``: the kept weights of each row in column order; bit
    ``j % 32`` of word ``j // 32`` set when column ``j`` is kept (as a signed int32); values
    ``(out, nnz_row)`` and no offsets when the rows' counts are equal, else 1-D values and
    ``row_offsets (out + 1,)`` int64. Without a mask: :func:`bitmap_nonzero_mask`."""
    if mask is None:
        mask = bitmap_nonzero_mask(weight)
    out, in_features = weight.shape
    words = (in_features + 31) // 32
    rows, bitmap = [], torch.zeros(out, words, dtype=torch.int32)
    for i in range(out):
        kept = [j for j in range(in_features) if bool(mask[i, j])]
        rows.append(weight[i, kept] if kept else weight.new_zeros(0))
        for w in range(words):
            word = sum(1 << (j - 32 * w) for j in kept if 32 * w <= j < 32 * w + 32)
            bitmap[i, w] = word - (1 << 32) if word >= 1 << 31 else word
    counts = [len(r) for r in rows]
    bitmap = bitmap.to(weight.device)
    if len(set(counts)) == 1:
        return torch.stack(rows), bitmap, None
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(weight.device)
    return torch.cat(rows), bitmap, offsets


def _row_values(values: torch.Tensor, row_offsets, i: int) -> torch.Tensor:
    if row_offsets is None:
        return values[i]
    return values[int(row_offsets[i]): int(row_offsets[i + 1])]


def bitmap_columns(bitmap: torch.Tensor, in_features: int, i: int) -> list[int]:
    """The kept columns of row ``i``, in order."""
    return [j for j in range(in_features) if (int(bitmap[i, j // 32]) >> (j % 32)) & 1]


def decompress_bitmap(values: torch.Tensor, bitmap: torch.Tensor, in_features: int, row_offsets=None):
    """The dense ``(out, in_features)`` weight: row i's values placed at its kept columns."""
    out = bitmap.shape[0]
    dense = torch.zeros(out, in_features, dtype=values.dtype, device=values.device)
    for i in range(out):
        cols = bitmap_columns(bitmap, in_features, i)
        row = _row_values(values, row_offsets, i)
        assert len(cols) == len(row), f"row {i}: {len(cols)} bits but {len(row)} values"
        for place, j in enumerate(cols):
            dense[i, j] = row[place]
    return dense


def chunk_offsets(values: torch.Tensor, bitmap: torch.Tensor, in_features: int, row_offsets=None,
                  chunk_cols: int = 1024) -> torch.Tensor:
    """Entry ``(i, c)``: where in the flattened values row i's first kept weight at or after
    column ``c * chunk_cols`` is (or would be)."""
    out = bitmap.shape[0]
    n_chunks = (in_features + chunk_cols - 1) // chunk_cols
    table = torch.zeros(out, n_chunks, dtype=torch.int32)
    for i in range(out):
        start = i * values.shape[1] if row_offsets is None else int(row_offsets[i])
        cols = bitmap_columns(bitmap, in_features, i)
        for c in range(n_chunks):
            table[i, c] = start + sum(1 for j in cols if j < c * chunk_cols)
    return table


def bitmap_linear(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, bias=None, row_offsets=None):
    """``x @ W^T + b`` in fp32, W given by its kept values and their columns (no dense weight)."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features).float()
    y = torch.zeros(x2d.shape[0], bitmap.shape[0])
    for i in range(bitmap.shape[0]):
        cols = bitmap_columns(bitmap, in_features, i)
        y[:, i] = x2d[:, cols] @ _row_values(values, row_offsets, i).float()
    if bias is not None:
        y += bias.float()
    return y.reshape(*x.shape[:-1], bitmap.shape[0])


# ---------------------------------------------------------------------------
# The N:M channel permutation search (RIA's reallocation + linear sum assignment).


def nm_kept_score(scores: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Twin of ``llm.permute.kept_score``: the sum (fp64) of the N largest of every M columns in ``perm``'s order."""
    s = scores if perm is None else scores[:, perm]
    groups = s.double().reshape(s.shape[0], -1, m)
    return float(groups.sort(dim=-1, descending=True).values[..., :n].sum())


def nm_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 1) -> torch.Tensor:
    """Twin of ``llm.permute.nm_permutation``, written out (fp64, full gain tensors).

    1. The identity, or RIA's reallocation if it keeps more: channels by total score,
       weakest first, cut in M bands; position ``p`` of every group takes band ``p``
       (reversed for odd ``p``).
    2. For each position ``p`` (``rounds`` times): with the other positions fixed, the
       channel moved into group ``g`` keeps ``max(0, S[i, c] - t[i, g])`` more in row
       ``i`` than the group's fixed channels alone, ``t[i, g]`` their N-th largest; a
       linear sum assignment maximises the sum over groups. The result replaces the
       permutation only if :func:`nm_kept_score` grows.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    groups = cols // m
    order = scores.double().sum(dim=0).argsort(stable=True)
    realloc = torch.empty_like(order)
    for p in range(m):
        band = order[p * groups : (p + 1) * groups]
        realloc[p::m] = band if p % 2 == 0 else band.flip(0)
    best = torch.arange(cols)
    if nm_kept_score(scores, n, m, realloc) > nm_kept_score(scores, n, m, best):
        best = realloc
    for _ in range(rounds):
        for p in range(m):
            s = scores[:, best].double().reshape(rows, groups, m)
            others = torch.cat([s[:, :, :p], s[:, :, p + 1 :]], dim=2)
            t = others.sort(dim=2, descending=True).values[:, :, n - 1]  # (rows, groups)
            cand = s[:, :, p]  # (rows, channels at position p, by their group now)
            gain = (cand.t()[:, None, :] - t.t()[None, :, :]).clamp_min(0).sum(dim=2)  # (channel, group)
            channel, group = linear_sum_assignment(gain.numpy(), maximize=True)
            trial = best.clone()
            trial[torch.as_tensor(group) * m + p] = best[p::m][torch.as_tensor(channel)]
            if nm_kept_score(scores, n, m, trial) > nm_kept_score(scores, n, m, best):
                best = trial
    return best


# ---------------------------------------------------------------------------
# The paper's sequential loop (Wanda, or magnitude), written out.


@torch.no_grad()
def sequential_prune(layers, inputs: torch.Tensor, layer_kwargs: dict | list, sparsity: float | None = 0.5, *,
                     pattern: str = "unstructured", metric: str = "wanda", scope: str = "row") -> torch.Tensor:
    """Reference of :func:`wanda_kernels.prune_model` for ``nn.Linear`` layers, in place.

    For each layer: run it on every calibration sample (one at a time), keeping the fp32
    sum of ``x**2`` over the tokens of each forward call per linear; sum those per-call
    rows in fp64 (the order-free sum that lets ``prune_model`` split the samples over
    processes), prune each linear with :func:`prune` on ``sqrt`` of that, then run the
    layer again to produce the next layer's inputs. A linear the layer never calls (its
    weight read by the layer itself) is left as it is.

    Fused mixture-of-experts weights in Mixtral's layout (a module with 3-D
    ``gate_up_proj`` ``(experts, 2 * inner, hidden)``, gate rows first, and ``down_proj``
    ``(experts, hidden, inner)``, called as ``(hidden_states, top_k_index, weights)``):
    each expert's two matrices are pruned like linears, with the norms of the tokens
    routed to it and of ``act_fn(gate) * up`` on them; an expert no token reached is
    pruned by magnitude (unit norms). Llama 4's (one stacked, router-scaled argument
    ``(experts * tokens, hidden)``, ``gate_up_proj`` ``(experts, hidden, 2 * inner)``,
    ``down_proj`` ``(experts, inner, hidden)``): each expert's nonzero rows of its block.

    Args:
        layers: the decoder layers, in order.
        inputs: ``(nsamples, seqlen, hidden)``: the first layer's inputs.
        layer_kwargs: the keyword arguments every layer call takes; or a list of one
            ``(args, kwargs)`` per layer: the positional arguments after the hidden
            states and the keyword arguments that layer takes.

    Returns:
        The last layer's outputs for the pruned model.
    """
    if sparsity is None:
        sparsity = 0.5
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [((), layer_kwargs)] * len(layers)
    h = inputs
    for layer, (layer_args, kwargs) in zip(layers, layer_kwargs, strict=True):
        # (a subclass with a forward of its own, such as Llama 4's router, is not a linear layer)
        linears = {n: m for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward}
        sums: dict[str, list[torch.Tensor]] = {}

        def record(name, sums):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums.setdefault(name, []).append((x * x).sum(dim=0))
            return hook

        experts = {n: m for n, m in layer.named_modules()
                   if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor) and m.gate_up_proj.dim() == 3}
        # Llama 4's layout has none of Mixtral's flags; its weights are stored (experts, in, out)
        stacked = {n: not hasattr(m, "is_transposed") for n, m in experts.items()}

        def record_experts(name, sums, is_stacked):
            def hook(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                for e in range(mod.gate_up_proj.shape[0]):
                    if is_stacked:  # expert e's block of the stacked rows, its nonzero ones
                        block = x.reshape(mod.gate_up_proj.shape[0], -1, x.shape[-1])[e]
                        routed = block[block.abs().sum(dim=-1) > 0]
                        gate, up = (routed @ mod.gate_up_proj[e]).chunk(2, dim=-1)
                    else:
                        routed = x[(args[1].reshape(x.shape[0], -1) == e).any(dim=-1)]
                        gate, up = torch.nn.functional.linear(routed, mod.gate_up_proj[e]).chunk(2, dim=-1)
                    inner = mod.act_fn(gate) * up
                    for part, seen in (("gate_up_proj", routed), ("down_proj", inner)):
                        sums.setdefault((name, e, part), []).append((seen.float() ** 2).sum(dim=0))
            return hook

        handles = [m.register_forward_pre_hook(record(n, sums)) for n, m in linears.items()]
        handles += [m.register_forward_pre_hook(record_experts(n, sums, stacked[n])) for n, m in experts.items()]
        for j in range(h.shape[0]):
            layer(h[j : j + 1], *layer_args, **kwargs)
        for handle in handles:
            handle.remove()
        # a linear the layer never called (Mamba's dt_proj: the mixer multiplies its weight
        # itself) has no inputs to rank by: left as it is, by every metric
        weights = {name: module.weight.data for name, module in linears.items() if name in sums}
        for name, module in experts.items():
            for e in range(module.gate_up_proj.shape[0]):
                weights.update({(name, e, part): getattr(module, part).data[e].t() if stacked[name]
                                else getattr(module, part).data[e] for part in ("gate_up_proj", "down_proj")})
        for name, weight in weights.items():
            norms = torch.stack(sums[name]).double().sum(dim=0).float().sqrt() if metric == "wanda" else None
            if norms is not None and isinstance(name, tuple) and not norms.any():
                norms = torch.ones_like(norms)  # an expert no token reached: by magnitude
            pruned, _ = prune(weight, norms, sparsity, pattern=pattern, metric=metric, scope=scope)
            weight.copy_(pruned)
        outs = [layer(h[j : j + 1], *layer_args, **kwargs) for j in range(h.shape[0])]
        h = torch.cat([o[0] if isinstance(o, (tuple, list)) else o for o in outs])
    return h
