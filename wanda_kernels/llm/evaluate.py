"""Perplexity over non-overlapping windows, as the paper's WikiText evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._progress import progress_bar

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True) -> float:
    """``exp(mean next-token NLL)`` of ``model`` over ``windows``.

    Args:
        model: a causal LM returning ``.logits`` ``(batch, seqlen, vocab)``.
        windows: ``(n, seqlen)`` int64 token ids, non-overlapping windows of the text
            (:func:`wanda_kernels.llm.data.eval_windows`); each is scored on its own.
        batch_size: windows per forward.
        progress: a tqdm bar over the batches.

    Returns:
        The perplexity, a float (NLL summed in fp32 over ``n * (seqlen - 1)`` predictions).
    """
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be int64 (n, seqlen); got {windows.dtype} {tuple(windows.shape)}")
    device = model.get_input_embeddings().weight.device
    starts = progress_bar(range(0, windows.shape[0], batch_size), progress, "perplexity", unit="batch")
    nll, count = 0.0, 0
    for s in starts:
        ids = windows[s : s + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
