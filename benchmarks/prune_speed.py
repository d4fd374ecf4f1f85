"""How fast is the Wanda mask kernel? ``python benchmarks/prune_speed.py``

For LLaMA-7B/13B/70B linear shapes and the patterns unstructured 50%, 2:4 and 4:8,
times in one run:

* ours: the Triton mask kernel pruning W in place (and the public ``prune_`` call,
  which adds argument checks), on CUDA;
* the reference way, as the paper's code does it: ``torch.sort`` of every row's scores
  for unstructured, a Python loop over column groups with ``torch.topk`` for N:M;
* a plain device copy of W, as the bandwidth yardstick.

GB/s counts the bytes the op must move: read W and the norms, write W.
Without CUDA it times the CPU torch path against the same reference at smaller
shapes (a slice of each layer's rows), and says so.
Results go to a new ``benchmarks/results/prune_speed_<device>_<date>.json`` (earlier runs are never overwritten).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

import wanda_kernels as wk
from _common import LLAMA_SHAPES, bench_ms, environment, format_table, gbps, write_results
from wanda_kernels import reference

log = logging.getLogger("prune_speed")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CPU_ROWS = 256  # rows of each layer timed on CPU


def paper_unstructured_(w: torch.Tensor, norms: torch.Tensor, sparsity: float) -> None:
    """The reference algorithm: a stable sort of every row's scores (locuslab/wanda's way)."""
    score = reference.wanda_score(w, norms)
    w.masked_fill_(~reference.unstructured_mask(score, sparsity), 0)


def paper_nm_(w: torch.Tensor, norms: torch.Tensor, n: int, m: int) -> None:
    """The paper code's N:M loop: one torch.topk per group of m columns."""
    score = reference.wanda_score(w, norms)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for ii in range(0, score.shape[1], m):
        tmp = score[:, ii : ii + m]
        pruned.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    w.masked_fill_(pruned, 0)


def run_case(model, layer, shape, pattern, dtype, device, skip_loop_above):
    rows, cols = shape
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(rows, cols, generator=g, device=device).to(dtype)
    norms = torch.rand(cols, generator=g, device=device) + 0.1
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    w_bytes = w.numel() * w.element_size()
    moved = 2 * w_bytes + norms.numel() * norms.element_size()

    row = dict(model=model, layer=layer, out_features=rows, in_features=cols, pattern=pattern,
               dtype=str(dtype).replace("torch.", ""), bytes_moved=moved)
    kw = dict(pattern=pattern) if nm else dict(sparsity=0.5)
    if device.type == "cuda":
        from wanda_kernels.kernels.wanda_mask import launch_wanda_mask

        norms32 = norms.float().contiguous()
        k = None if nm else reference.num_pruned(cols, 0.5)
        row["ours_ms"] = bench_ms(
            lambda: launch_wanda_mask(w, norms32, k_prune=k, nm=nm, write_weight=True, mask=None), device)
        row["ours_api_ms"] = bench_ms(lambda: wk.prune_(w, norms, **kw), device)
        dst = torch.empty_like(w)
        row["copy_ms"] = bench_ms(lambda: dst.copy_(w), device)
        row["copy_gbps"] = gbps(2 * w_bytes, row["copy_ms"])
        row["ours_impl"] = "triton"
    else:
        row["ours_ms"] = bench_ms(lambda: wk.prune_(w, norms, backend="torch", **kw), device)
        row["ours_impl"] = "torch (CPU path)"
    row["ours_gbps"] = gbps(moved, row["ours_ms"])

    if nm is None:
        row["baseline"] = "torch.sort per row"
        row["baseline_ms"] = bench_ms(lambda: paper_unstructured_(w, norms, 0.5), device)
    elif cols // nm[1] <= skip_loop_above:
        row["baseline"] = "per-group topk loop"
        row["baseline_ms"] = bench_ms(lambda: paper_nm_(w, norms, *nm), device)
    else:
        row["baseline"], row["baseline_ms"] = "per-group topk loop (skipped)", None
    if row["baseline_ms"] is not None:
        row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    if "copy_gbps" in row:
        row["pct_of_copy"] = 100.0 * row["ours_gbps"] / row["copy_gbps"]
    return row


CALIB_TOKENS = 8192  # activation rows per act-norm call: 4 x 2048-token calibration samples


def run_norms_case(model, layer, shape, dtype, device, tokens=CALIB_TOKENS):
    """Act-norm accumulation over ``(tokens, in)`` activations vs torch's ``x.float().pow(2).sum(0)``."""
    cols = shape[1]
    x = torch.randn(tokens, cols, device=device).to(dtype)
    sq = torch.zeros(cols, device=device)
    moved = x.numel() * x.element_size() + 2 * 4 * cols
    row = dict(model=model, layer=layer, out_features=shape[0], in_features=cols, pattern="act-norms",
               dtype=str(dtype).replace("torch.", ""), bytes_moved=moved, tokens=tokens)
    ref = x.double().pow(2).sum(0)
    wk.accumulate_sq_norms_(sq, x)
    if not torch.allclose(sq.double(), ref, rtol=1e-4):  # fp32 sums of tokens terms
        raise RuntimeError(f"act-norms {shape}: wrong result")
    row["ours_ms"] = bench_ms(lambda: wk.accumulate_sq_norms_(sq, x), device)
    row["ours_impl"] = "triton" if device.type == "cuda" else "torch (CPU path)"
    row["baseline"] = "x.float().pow(2).sum(0)"
    row["baseline_ms"] = bench_ms(lambda: sq.add_(x.float().pow(2).sum(0)), device)
    return _finish(row, x, device)


def run_compress_case(model, layer, shape, dtype, device):
    """Fused Wanda 2:4 prune + compress (reads W once; writes values and metadata) vs prune_ then compress_24."""
    rows_, cols = shape
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(rows_, cols, generator=g, device=device).to(dtype)
    norms = torch.rand(cols, generator=g, device=device) + 0.1
    moved = w.numel() * w.element_size() * 3 // 2 + w.numel() // 8 + 4 * cols  # read W, write W/2 + meta
    row = dict(model=model, layer=layer, out_features=rows_, in_features=cols, pattern="prune+compress 2:4",
               dtype=str(dtype).replace("torch.", ""), bytes_moved=moved)
    v, m = wk.prune_compress_24(w, norms)
    tv, tm = wk.prune_compress_24(w, norms, backend="torch")
    if not (torch.equal(v.view(torch.int16), tv.view(torch.int16)) and torch.equal(m, tm)):
        raise RuntimeError(f"prune+compress {shape}: differs from the torch path")
    row["ours_ms"] = bench_ms(lambda: wk.prune_compress_24(w, norms), device)
    row["ours_impl"] = "triton" if device.type == "cuda" else "torch (CPU path)"

    def two_steps():
        w2 = w.clone()
        wk.prune_(w2, norms, pattern="2:4")
        return wk.compress_24(w2)

    row["baseline"] = "clone + prune_ + compress_24"
    row["baseline_ms"] = bench_ms(two_steps, device)
    return _finish(row, w, device)


def _finish(row, big, device):
    row["ours_gbps"] = gbps(row["bytes_moved"], row["ours_ms"])
    row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    if device.type == "cuda":
        dst = torch.empty_like(big)
        row["copy_ms"] = bench_ms(lambda: dst.copy_(big), device)
        row["copy_gbps"] = gbps(2 * big.numel() * big.element_size(), row["copy_ms"])
        row["pct_of_copy"] = 100.0 * row["ours_gbps"] / row["copy_gbps"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(LLAMA_SHAPES), choices=list(LLAMA_SHAPES),
                   help="LLaMA sizes whose linear shapes are timed (default: all)")
    p.add_argument("--patterns", nargs="+", default=["unstructured", "2:4", "4:8"],
                   help="sparsity patterns (default: unstructured 50%%, 2:4, 4:8)")
    p.add_argument("--ops", nargs="+", default=["mask", "norms", "compress"], choices=["mask", "norms", "compress"],
                   help="mask: Wanda mask per pattern; norms: act-norm accumulation; "
                   "compress: fused 2:4 prune+compress")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="weight dtype (default fp16)")
    p.add_argument("--cpu-rows", type=int, default=CPU_ROWS,
                   help=f"on CPU, rows of each layer to time (default {CPU_ROWS})")
    p.add_argument("--skip-loop-above", type=int, default=10**9,
                   help="skip the per-group Python loop baseline for rows with more groups than this")
    p.add_argument("--out-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    if device.type == "cpu":
        log.info("No CUDA device: timing the CPU torch path against the reference on the first %d rows "
                 "of each layer (not GPU numbers).", args.cpu_rows)
        env["note"] = f"CPU run: torch path vs reference on {args.cpu_rows}-row slices of each layer"
    log.info("Device: %s | torch %s | triton %s", env["device_name"], env["torch"], env["triton"])

    rows = []
    for model in args.models:
        for layer, shape in LLAMA_SHAPES[model].items():
            if device.type == "cpu":
                shape = (min(shape[0], args.cpu_rows), shape[1])
            dtype = DTYPES[args.dtype]
            cases = [(run_case, (model, layer, shape, pattern, dtype, device, args.skip_loop_above))
                     for pattern in (args.patterns if "mask" in args.ops else [])]
            if "norms" in args.ops:
                cases.append((run_norms_case, (model, layer, shape, dtype, device,
                                               CALIB_TOKENS if device.type == "cuda" else 256)))
            if "compress" in args.ops and dtype != torch.float32 and shape[0] % 32 == 0:
                cases.append((run_compress_case, (model, layer, shape, dtype, device)))
            for fn, case_args in cases:
                rows.append(fn(*case_args))
                r = rows[-1]
                pattern = r["pattern"]
                log.info("%s %-8s %-12s %-12s ours %8.3f ms (%6.1f GB/s)  baseline %s ms", model, layer,
                         f"{shape[0]}x{shape[1]}", pattern, r["ours_ms"], r["ours_gbps"],
                         "-" if r["baseline_ms"] is None else f"{r['baseline_ms']:.3f}")

    cols = [("model", "model", ""), ("layer", "layer", ""), ("out_features", "out", "d"),
            ("in_features", "in", "d"), ("pattern", "pattern", ""), ("ours_ms", "ours ms", ".3f"),
            ("ours_gbps", "ours GB/s", ".1f")]
    if device.type == "cuda":
        cols += [("copy_gbps", "copy GB/s", ".1f"), ("pct_of_copy", "% of copy", ".1f"),
                 ("ours_api_ms", "prune_ ms", ".3f")]
    cols += [("baseline_ms", "baseline ms", ".3f"), ("speedup", "speedup", ".1f")]
    print(format_table(rows, cols))
    path = write_results("prune_speed", env, rows, args.out_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
