"""Decode throughput of a LLaMA-7B-shaped decoder, dense vs sparse: ``python benchmarks/e2e_decode.py``

A stack of random LLaMA-7B-shaped decoder layers (hidden 4096, MLP 11008, 32 heads,
RMSNorm, SwiGLU, attention over a KV cache; 32 layers by default) is pruned with Wanda
(random activation norms), then timed generating tokens one step at a time at batch 1
and 16: first dense (the pruned weights in nn.Linear, cuBLAS), then after ``sparsify_``.
Each ``--formats`` entry is one model: ``2:4`` (pruned 2:4, SparseLinear, CUTLASS) and
``bitmap`` (pruned 50% unstructured, BitmapLinear, Triton). Reports tokens/s, the
speedup and the weight memory of each; writes JSON under ``benchmarks/results/``. Needs
a CUDA GPU (exits with status 2 otherwise).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import capture_graph, environment, event_ms, format_table, write_results

log = logging.getLogger("e2e_decode")


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.input_norm = nn.RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.post_norm = nn.RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, cache_k, cache_v, pos: int):
        b = x.shape[0]
        h = self.input_norm(x)
        q, k, v = (p(h).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cache_k[:, :, pos : pos + 1] = k
        cache_v[:, :, pos : pos + 1] = v
        attn = F.scaled_dot_product_attention(q, cache_k[:, :, : pos + 1], cache_v[:, :, : pos + 1])
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, 1, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def _weight_bytes(layers: nn.Module) -> int:
    """Bytes of the linear layers' weights as stored (dense, SparseLinear or BitmapLinear)."""
    import wanda_kernels as wk

    total = 0
    for m in layers.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, wk.SparseLinear):
            total += sum(t.numel() * t.element_size() for t in (m.values, m.meta))
        elif isinstance(m, wk.BitmapLinear):
            total += m.nbytes()
    return total


def decode_tokens_per_s(layers, batch, context, steps, hidden, heads, device, dtype, repeats=3, graph=False):
    """Greedy-decode throughput: ``batch * steps`` tokens over the median time of ``steps`` steps.

    Eager: one Python call per layer per step (host launch cost included, as a plain loop
    sees it). ``graph=True`` (CUDA): one decode step at position ``context`` (all layers)
    captured in a CUDA graph and replayed ``steps`` times, timed with CUDA events: the
    GPU time a graph-capturing server (or ``torch.compile(mode="reduce-overhead")``) pays.
    """
    head_dim = hidden // heads
    gen = torch.Generator(device=device).manual_seed(batch)  # the same cache and input for dense and sparse
    caches = [tuple(torch.randn(batch, heads, context + steps, head_dim, generator=gen, device=device, dtype=dtype)
                    for _ in range(2)) for _ in layers]
    x0 = torch.randn(batch, 1, hidden, generator=gen, device=device, dtype=dtype)

    def step(x, pos):
        for layer, (ck, cv) in zip(layers, caches):
            x = layer(x, ck, cv, pos)
        return x

    with torch.no_grad():
        if graph:
            g, out = capture_graph(lambda: step(x0, context), device)

            def replays():
                for _ in range(steps):
                    g.replay()

            times = [event_ms(replays) / 1e3 for _ in range(repeats)]
            return batch * steps / statistics.median(times), out.clone()

        def run(n):
            x = x0
            for i in range(n):
                x = step(x, context + i)
            return x

        run(2)  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return batch * steps / statistics.median(times), step(x0, context)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (LLaMA-7B: 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV cache")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--formats", nargs="+", default=["2:4", "bitmap"], choices=["2:4", "bitmap"],
                   help="sparse formats to time, each on its own pruned model (default: both)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU with a tiny model (for CI)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
        args.layers, args.hidden, args.intermediate, args.heads, args.context, args.steps = 2, 128, 256, 4, 16, 4
    else:
        print("e2e_decode.py measures GPU decoding and needs a CUDA GPU; none is visible here "
              "(torch.cuda.is_available() is False).", file=sys.stderr)
        return 2

    import wanda_kernels as wk

    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    dims = (args.context, args.steps, args.hidden, args.heads, device, dtype)
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    rows = []
    for fmt in args.formats:
        torch.manual_seed(0)
        with torch.device(device):  # built on the GPU: no 26 GB of fp32 weights on the host
            layers = nn.ModuleList(DecoderLayer(args.hidden, args.intermediate, args.heads)
                                   for _ in range(args.layers))
        layers = layers.to(dtype)
        prune = dict(pattern="2:4") if fmt == "2:4" else dict(sparsity=0.5)
        for lin in (m for m in layers.modules() if isinstance(m, nn.Linear)):
            wk.prune_(lin, torch.rand(lin.in_features, device=device) + 0.1, **prune)
        dense_bytes = _weight_bytes(layers)
        log.info("%d layers, hidden %d, MLP %d, %s, pruned %s", args.layers, args.hidden, args.intermediate, dtype,
                 fmt if fmt == "2:4" else "50% unstructured")
        fmt_rows, dense_out = [], {}
        for b in args.batches:
            for mode in modes:
                tok_s, dense_out[b, mode] = decode_tokens_per_s(layers, b, *dims, graph=mode == "graph")
                fmt_rows.append(dict(format=fmt, batch=b, mode=mode, dense_tok_s=tok_s))
        replaced = wk.sparsify_(layers, format=fmt)
        kernel = layers[0].q_proj.kernel()
        sparse_bytes = _weight_bytes(layers)
        log.info("sparsify_(format=%r) replaced %d linear layers (kernel: %s); weights %.2f of dense bytes", fmt,
                 len(replaced), kernel, sparse_bytes / dense_bytes)
        for row in fmt_rows:
            row["sparse_tok_s"], sparse_out = decode_tokens_per_s(layers, row["batch"], *dims,
                                                                  graph=row["mode"] == "graph")
            ref = dense_out[row["batch"], row["mode"]].float()
            # Same weights, same inputs: the two outputs differ by summation order only.
            row["rel_diff_vs_dense"] = float((sparse_out.float() - ref).norm() / ref.norm())
            row["outputs_match"] = row["rel_diff_vs_dense"] < 5e-2  # False for NaN too
            row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
            row.update(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, context=args.context,
                       steps=args.steps, dtype=args.dtype, sparse_kernel=kernel,
                       weight_bytes_ratio=sparse_bytes / dense_bytes)
        rows += fmt_rows
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(rows, [("format", "format", ""), ("batch", "batch", "d"), ("mode", "mode", ""),
                              ("dense_tok_s", "dense tok/s", ".1f"), ("sparse_tok_s", "sparse tok/s", ".1f"),
                              ("speedup", "speedup", ".2f"), ("weight_bytes_ratio", "weight bytes", ".3f"),
                              ("rel_diff_vs_dense", "rel diff", ".2e")]))
    env = environment(device)
    if device.type == "cpu":
        env["note"] = "CPU smoke run of the script: not a GPU measurement"
    print(f"\nwrote {write_results('e2e_decode', env, rows, args.out_dir)}")
    bad = [r for r in rows if not r["outputs_match"]]
    for r in bad:
        log.error("sparse decode output differs from dense: relative difference %.3g at batch %d (%s, %s)",
                  r["rel_diff_vs_dense"], r["batch"], r["mode"], r["format"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
