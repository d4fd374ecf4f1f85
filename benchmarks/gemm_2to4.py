"""2:4 and bitmap (unstructured 50%) sparse GEMMs vs dense: ``python benchmarks/gemm_2to4.py``

For LLaMA-7B/13B/70B linear shapes and 1, 16, 128, 2048, 8192 tokens, in fp16 and
bf16, times in one run (``triton.testing.do_bench`` medians):

* dense    ``torch.nn.functional.linear`` (cuBLAS);
* ours     ``SparseLinear`` end to end, with whichever kernel dispatch picks on this GPU
           (sm90a on compute capability 9.0, sm80 on 8.x);
* sm80     the CUTLASS sm80 kernel (mma.sp) alone, where it runs (8.x, and 9.0 through
           its sm_90 build);
* sm90     the CUTLASS 3.x sm90a kernels (sparse wgmma) alone, each configuration:
           ``decode`` 64x32x256, ``large`` 128x128x128 with a 1x2 cluster, ``streamk``
           128x32x256 with stream-K (compute capability 9.0 only);
* torch    PyTorch's ``to_sparse_semi_structured`` weight in ``F.linear`` (its CUTLASS
           backend on 8.x, cuSPARSELt elsewhere; the table says which ran, or why none could);
* bitmap   ``BitmapLinear`` end to end: the same shape pruned 50% *unstructured* (Wanda's
           better-quality pattern) in the bitmap format, Triton kernel (0.5625 of the dense
           bytes: the memory-bound ceiling is 1.78x dense).

TFLOP/s are effective dense rates, 2 * tokens * out * in / time, for every column, so
they compare directly. GB/s count the bytes each method must move at least (weight as
stored, with metadata for 2:4, plus x and y), and ``% peak`` relates them to the GPU's
spec-sheet memory bandwidth, and ``% copy`` to a device copy measured in the same run:
the figures that matter at 1-16 tokens, where the GEMM is memory-bound. Writes JSON and
CSV with the GPU name and versions, and a PNG of the speedup over dense against tokens,
under ``benchmarks/results/``. Needs a CUDA GPU: without one it says so and exits with
status 2.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys

import torch
import torch.nn.functional as F

from _common import (
    LLAMA_SHAPES,
    bench_ms,
    copy_gbps,
    environment,
    format_table,
    gbps,
    graph_ms,
    peak_hbm_gbps,
    pyplot,
    rotation_copies,
    tflops,
    write_results,
)
from wanda_kernels.gemm24 import SM90_CONFIGS

log = logging.getLogger("gemm_2to4")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS = [1, 16, 128, 2048, 8192]


def torch_semi_structured(weight: torch.Tensor, only: str | None = None) -> list[tuple[str, object]]:
    """PyTorch's 2:4 weight for F.linear with **every** backend that accepts it here.

    Returns ``[(backend, sparse weight or the reason it was refused)]`` for "cutlass"
    (PyTorch's own CUTLASS kernels; compute capability 8.x in current releases) and
    "cusparselt" (where this torch build has it).
    """
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    except ImportError as exc:
        return [("none", f"unavailable ({exc})")]
    cusparselt = getattr(torch.backends, "cusparselt", None)
    out = []
    for force_cutlass, name in ((True, "cutlass"), (False, "cusparselt")):
        if only and name != only:
            continue
        if name == "cusparselt" and not (cusparselt and cusparselt.is_available()):
            out.append((name, "cuSPARSELt is not available in this torch build"))
            continue
        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
        try:
            sparse = to_sparse_semi_structured(weight)
            F.linear(torch.zeros(8, weight.shape[1], dtype=weight.dtype, device=weight.device), sparse)
            out.append((name, sparse))
        except Exception as exc:  # noqa: BLE001 - report any refusal as the reason
            out.append((name, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__))
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return out


def kernels_here(device: torch.device) -> dict[str, bool]:
    """Which of our kernels can run alone on ``device``."""
    from wanda_kernels.gemm24 import extension, runs_on, sm90_built

    if device.type != "cuda" or extension() is None:
        return {"sm80": False, "sm90": False}
    cc = torch.cuda.get_device_capability(device)
    return {"sm80": cc[0] in (8, 9) and runs_on(*cc), "sm90": cc == (9, 0) and sm90_built()}


GRAPH_MAX_TOKENS = 128  # up to here kernels last microseconds: time CUDA-graph replays, not Python calls


def _timer(device, tokens, notes: dict):
    """``(method, time(key, fns))``: graph replays rotating over ``fns`` at decode sizes, else do_bench.

    Where a method cannot be captured in a CUDA graph, it is timed with do_bench instead
    and ``notes[key]`` says so (with the capture's error).
    """
    if device.type == "cuda" and tokens <= GRAPH_MAX_TOKENS:
        def time_fns(key, fns):
            try:
                return graph_ms(fns, device)
            except Exception as exc:  # noqa: BLE001 - fall back, and say so in the results
                torch.cuda.synchronize(device)
                notes[key] = f"do_bench (no graph capture: {str(exc).splitlines()[0][:120]})"
                return bench_ms(fns[0], device)
        return "cuda-graph replay, weights rotated past L2", time_fns
    return "triton do_bench median", lambda key, fns: bench_ms(fns[0], device)


def run_case(model, layer, shape, tokens, dtype, device, kernels, bandwidth):
    import copy

    import wanda_kernels as wk
    from wanda_kernels.gemm24 import launch_sm80, launch_sm90, pad_input, sm80_tokens
    from wanda_kernels.sparse24 import meta_sm80_to_sm90

    out_f, in_f = shape
    g = torch.Generator(device=device).manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    wk.prune_(lin, torch.rand(in_f, generator=g, device=device) + 0.1, pattern="2:4")
    weight = lin.weight.detach()
    x = torch.randn(tokens, in_f, generator=g, device=device, dtype=dtype)
    flops = 2.0 * tokens * out_f * in_f
    elt = weight.element_size()
    io_bytes = elt * tokens * (in_f + out_f)
    moved = {"dense": elt * out_f * in_f + io_bytes,  # the least each method must read and write
             "sparse": elt * out_f * in_f // 2 + out_f * in_f // 8 + io_bytes,
             "bitmap": elt * out_f * in_f // 2 + 4 * out_f * -(-in_f // 32) + io_bytes}
    row = dict(model=model, layer=layer, out_features=out_f, in_features=in_f, tokens=tokens,
               dtype=str(dtype).replace("torch.", ""))
    notes = {}
    method, time_fns = _timer(device, tokens, notes)
    n_copies = rotation_copies(moved["sparse"], device) if "graph" in method else 1
    row.update(timing=method, weight_copies=n_copies)
    ref = F.linear(x.float(), weight.float())
    dense_err = float((F.linear(x, weight).float() - ref).abs().max())
    timings, errors = {}, {}

    def check(key, y):
        """Every timed output is compared with fp32 F.linear before its time is reported."""
        err = float((y.float() - ref).abs().max())
        errors[key] = err
        if not err <= 2 * dense_err + 1e-3:  # NaN fails too
            raise RuntimeError(f"{key}: max error {err:.3g} vs dense {dense_err:.3g} ({model} {layer} {tokens} tok)")

    weights = [weight] + [weight.clone() for _ in range(n_copies - 1)]
    check("dense", F.linear(x, weight))
    timings["dense"] = time_fns("dense", [lambda w=w: F.linear(x, w) for w in weights])
    sl = wk.SparseLinear.from_linear(lin)
    row["ours_kernel"] = sl.kernel()
    check("ours", sl(x))
    sls = [sl] + [copy.deepcopy(sl) for _ in range(n_copies - 1)]
    timings["ours"] = time_fns("ours", [lambda m=m: m(x) for m in sls])
    if device.type == "cuda":
        timings["ours_eager"] = bench_ms(lambda: sl(x), device)  # Python and host work included
    del sls
    if kernels["sm80"] or kernels["sm90"]:
        values, meta80 = wk.compress_24(weight)
        vals = [values] + [values.clone() for _ in range(n_copies - 1)]
    if kernels["sm80"]:  # the kernel alone, into preallocated buffers (no padding, no output pass)
        xb = pad_input(x, sm80_tokens(tokens), in_f)
        d = torch.empty(out_f, xb.shape[0], dtype=dtype, device=device)
        launch_sm80(values, meta80, xb, d)
        check("sm80", d[:, :tokens].t())
        timings["sm80"] = time_fns("sm80", [lambda v=v: launch_sm80(v, meta80, xb, d) for v in vals])
    if kernels["sm90"]:
        meta90 = meta_sm80_to_sm90(meta80, out_f, in_f)
        y = torch.empty(tokens, out_f, dtype=dtype, device=device)
        for cfg in SM90_CONFIGS:
            y.fill_(float("nan"))
            launch_sm90(values, meta90, x, y, None, cfg)
            check(f"sm90_{cfg}", y)
            timings[f"sm90_{cfg}"] = time_fns(
                f"sm90_{cfg}", [lambda v=v, cfg=cfg: launch_sm90(v, meta90, x, y, None, cfg) for v in vals])
        row["sm90_best"] = min(SM90_CONFIGS, key=lambda c: timings[f"sm90_{c}"])
        timings["sm90"] = timings[f"sm90_{row['sm90_best']}"]
    for backend, sparse_w in torch_semi_structured(weight) if device.type == "cuda" else []:
        key = f"torch_{backend}"
        if isinstance(sparse_w, str):
            row[f"{key}_error"] = sparse_w
            continue
        try:
            check(key, F.linear(x, sparse_w))
            copies = [sparse_w] + [torch_semi_structured(weight.clone(), only=backend)[0][1]
                                   for _ in range(n_copies - 1)]
            timings[key] = time_fns(key, [lambda s=s: F.linear(x, s) for s in copies])
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape is reported, not fatal
            row[f"{key}_error"] = str(exc).splitlines()[0][:200]
    # The bitmap format: the same shape pruned 50% unstructured, checked against its own weight.
    lin_u = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    wk.prune_(lin_u, torch.rand(in_f, generator=g, device=device) + 0.1, 0.5)
    bl = wk.BitmapLinear.from_linear(lin_u)
    row["bitmap_kernel"] = bl.kernel()
    w_u = lin_u.weight.detach()
    ref_u = F.linear(x.float(), w_u.float())
    err_u = float((bl(x).float() - ref_u).abs().max())
    dense_err_u = float((F.linear(x, w_u).float() - ref_u).abs().max())
    errors["bitmap"] = err_u
    if not err_u <= 2 * dense_err_u + 1e-3:
        raise RuntimeError(f"bitmap: max error {err_u:.3g} vs dense {dense_err_u:.3g} ({model} {layer} {tokens} tok)")
    bls = [bl] + [copy.deepcopy(bl) for _ in range(n_copies - 1)]
    timings["bitmap"] = time_fns("bitmap", [lambda m=m: m(x) for m in bls])
    del bls
    torch_keys = [k for k in timings if k.startswith("torch_")]
    if torch_keys:
        row["torch_best"] = min(torch_keys, key=timings.get)
        timings["torch"] = timings[row["torch_best"]]
    row["max_abs_err"] = errors
    if notes:
        row["timing_notes"] = notes

    for key in ("dense", "ours", "ours_eager", "sm80", *(f"sm90_{c}" for c in SM90_CONFIGS), "sm90", "torch",
                *torch_keys, "bitmap"):
        ms = timings.get(key)
        row[f"{key}_ms"] = ms
        row[f"{key}_tflops"] = tflops(flops, ms) if ms else None
        row[f"{key}_gbps"] = gbps(moved[key if key in ("dense", "bitmap") else "sparse"], ms) if ms else None
        if key != "dense":
            row[f"speedup_{key}"] = timings["dense"] / ms if ms else None
    for key in ("dense", "ours", "sm90", "bitmap"):
        for ref_name, ref in (("peak", bandwidth.get("peak_hbm_gbps")), ("copy", bandwidth.get("copy_gbps"))):
            row[f"{key}_pct_{ref_name}"] = 100.0 * row[f"{key}_gbps"] / ref if ref and row[f"{key}_gbps"] else None
    return row


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, dtype in zip(axes, ("float16", "bfloat16")):
        for (model, layer), group in _groups(rows, dtype).items():
            line, = ax.plot([r["tokens"] for r in group], [r["speedup_ours"] for r in group], marker="o",
                            label=f"{model} {layer} ({group[0]['out_features']}x{group[0]['in_features']}) 2:4")
            ax.plot([r["tokens"] for r in group], [r["speedup_bitmap"] for r in group], marker="s", ls=":",
                    color=line.get_color(), label=f"{model} {layer} bitmap 50%")
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(f"speedup over dense, {dtype}: 2:4 (solid), bitmap 50% (dotted)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dense time / sparse time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _groups(rows, dtype):
    groups = {}
    for r in rows:
        if r["dtype"] == dtype:
            groups.setdefault((r["model"], r["layer"]), []).append(r)
    return groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(LLAMA_SHAPES), choices=list(LLAMA_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS, help=f"token counts (default {TOKENS})")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--out-dir", default=None, help="where results go (default benchmarks/results)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="smoke-test this script on CPU at tiny shapes (no GPU numbers; for CI)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if torch.cuda.is_available():
        device = torch.device("cuda")
        shapes = {m: LLAMA_SHAPES[m] for m in args.models}
    elif args.allow_cpu:
        device = torch.device("cpu")
        shapes = {"tiny": {"smoke": (64, 128)}}
        args.tokens = [t for t in args.tokens if t <= 16] or [1]
    else:
        print("gemm_2to4.py times GPU kernels and needs a CUDA GPU (compute capability 8.0 or later); "
              "none is visible here (torch.cuda.is_available() is False).", file=sys.stderr)
        return 2

    env = environment(device)
    kernels = kernels_here(device)
    bandwidth = {"peak_hbm_gbps": peak_hbm_gbps(device), "copy_gbps": copy_gbps(device, 1 << 30 if
                                                                                 device.type == "cuda" else 1 << 24)}
    env.update(bandwidth, kernels_timed=[k for k, ok in kernels.items() if ok])
    log.info("Device: %s | torch %s | triton %s | kernels alone: %s | peak %s GB/s, copy %.0f GB/s",
             env["device_name"], env["torch"], env["triton"], env["kernels_timed"] or "none",
             f"{bandwidth['peak_hbm_gbps']:.0f}" if bandwidth["peak_hbm_gbps"] else "?", bandwidth["copy_gbps"])
    if device.type == "cpu":
        env["note"] = "CPU smoke run of the script: not a GPU measurement"
    # A partial sweep (some models or dtypes) gets its own file: runs split across calls do not overwrite.
    subset = [*(args.models if set(args.models) != set(LLAMA_SHAPES) else []),
              *(args.dtypes if set(args.dtypes) != set(DTYPES) else [])]
    result_name = "_".join(["gemm_2to4", *subset])
    rows, failed = [], []
    json_path = None  # this run's file, once the first case is written
    for model, layers in shapes.items():
        for layer, shape in layers.items():
            for dtype_name in args.dtypes:
                for tokens in args.tokens:
                    try:
                        r = run_case(model, layer, shape, tokens, DTYPES[dtype_name], device, kernels, bandwidth)
                    except RuntimeError as exc:  # a wrong output: record it, time the other cases
                        log.error("%s %s %d tok %s: %s", model, layer, tokens, dtype_name, exc)
                        failed.append(dict(model=model, layer=layer, tokens=tokens, dtype=dtype_name, error=str(exc)))
                        continue
                    rows.append(r)
                    log.info("%s %-8s %5d tok %s: dense %.4f ms, ours %.4f ms (%.2fx), sm90 best %s, torch %s, "
                             "bitmap %.4f ms (%.2fx)", model, layer, tokens, dtype_name, r["dense_ms"], r["ours_ms"],
                             r["speedup_ours"], r.get("sm90_best"), f"{r['torch_ms']:.4f} ms ({r['torch_best']})"
                             if r.get("torch_ms") else "-", r["bitmap_ms"], r["speedup_bitmap"])
                    # Written after every case: a run stopped by a time limit keeps what it measured.
                    json_path = write_results(result_name, {**env, "failed": failed}, rows, args.out_dir,
                                              path=json_path)
    env["failed"] = failed
    if not rows:
        log.error("no case ran")
        return 1

    print(format_table(rows, [
        ("model", "model", ""), ("layer", "layer", ""), ("out_features", "out", "d"), ("in_features", "in", "d"),
        ("tokens", "tokens", "d"), ("dtype", "dtype", ""), ("dense_ms", "dense ms", ".4f"),
        ("dense_tflops", "TF/s", ".1f"), ("dense_pct_peak", "% peak", ".0f"), ("ours_ms", "ours ms", ".4f"),
        ("ours_tflops", "TF/s", ".1f"), ("ours_pct_peak", "% peak", ".0f"), ("speedup_ours", "x dense", ".2f"),
        ("sm80_ms", "sm80 ms", ".4f"), ("speedup_sm80", "x dense", ".2f"),
        ("sm90_decode_ms", "sm90 dec ms", ".4f"), ("sm90_large_ms", "sm90 large ms", ".4f"),
        ("sm90_streamk_ms", "sm90 sk ms", ".4f"), ("sm90_wide_ms", "sm90 wide ms", ".4f"),
        ("speedup_sm90", "best x dense", ".2f"),
        ("torch_ms", "torch ms", ".4f"), ("speedup_torch", "x dense", ".2f"), ("ours_eager_ms", "eager ms", ".4f"),
        ("bitmap_ms", "bitmap ms", ".4f"), ("bitmap_pct_peak", "% peak", ".0f"), ("speedup_bitmap", "x dense", ".2f"),
    ]))
    refused = sorted({f"{k[:-6]}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")})
    fastest = sorted({r.get("torch_best") for r in rows} - {None})
    print(f"\nPyTorch 2:4 backends fastest in some case: {fastest}; refused: {refused or 'none'}")
    print(f"SparseLinear kernel: {'; '.join(sorted({r['ours_kernel'] for r in rows}))}; BitmapLinear kernel: "
          f"{'; '.join(sorted({r['bitmap_kernel'] for r in rows}))}")
    json_path = write_results(result_name, env, rows, args.out_dir, path=json_path)
    csv_path = json_path.with_suffix(".csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path}, {csv_path}" + (f", {png}" if png else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
