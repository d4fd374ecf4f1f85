"""Which sm90a configuration wins where: ``python benchmarks/tune_sm90.py``

Times every sm90a configuration of wanda_kernels._C alone (no SparseLinear host
work) over a fine sweep of token counts on a few LLaMA shapes, with cuBLAS dense in
the same run, and prints for each (shape, tokens) the winner. The dispatch table in
``wanda_kernels/gemm24/policy.py`` (``SM90_DISPATCH``) is read off this output; the JSON
keeps the raw times. Decode sizes (<= 512 tokens) are timed as CUDA-graph replays
rotating through weight copies larger than L2, larger ones with do_bench. Every
configuration's output is checked against fp32 F.linear before it is timed.
Needs compute capability 9.0 and a build with the sm90a kernels.

``--schedules`` sweeps instead how the persistent configurations walk their tiles
(``Sm90Schedule``): swizzle x raster order of ``large`` and ``wide`` at many tokens on
every LLaMA shape, and split-K slice counts of ``streamk`` at decode sizes, each
beside cuBLAS and the configuration's default schedule in the same run. The schedule
rule in ``policy.sm90_schedule_for`` is read off that output.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn.functional as F

from _common import LLAMA_SHAPES, bench_ms, environment, graph_ms, rotation_copies, write_results

log = logging.getLogger("tune_sm90")

SHAPES = {"7B q/k/v/o": (4096, 4096), "7B gate/up": (11008, 4096), "70B k/v": (1024, 8192),
          "70B down": (8192, 28672)}
TOKENS = [1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192]
GRAPH_MAX_TOKENS = 512


def host_overhead(device, dtype, calls: int = 200) -> dict:
    """Wall-clock microseconds per call of each layer of the SparseLinear path at 1 token (host-bound)."""
    import time

    import wanda_kernels as wk
    from wanda_kernels.gemm24 import launch_sm90, sm90_linear

    lin = torch.nn.Linear(4096, 4096, bias=False, device=device, dtype=dtype)
    wk.prune_(lin, torch.rand(4096, device=device) + 0.1, pattern="2:4")
    sl = wk.SparseLinear.from_linear(lin)
    x = torch.randn(1, 4096, device=device, dtype=dtype)
    y = torch.empty(1, 4096, device=device, dtype=dtype)
    paths = {
        "F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, lin.weight),
        "SparseLinear.forward": lambda: sl(x),
        "torch.ops custom op": lambda: torch.ops.wanda_kernels.sparse24_linear(x, sl.values, sl.meta, None, 4096,
                                                                               sl.meta_format),
        "sm90_linear": lambda: sm90_linear(x, sl.values, sl.meta, None, 4096),
        "launch_sm90 (decode)": lambda: launch_sm90(sl.values, sl.meta, x, y, None, "decode"),
    }
    out = {}
    with torch.no_grad():
        for name, fn in paths.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
            out[name] = round((time.perf_counter() - t0) / calls * 1e6, 1)
    return out


SCHEDULE_TOKENS = [2048, 8192]
SPLITK_TOKENS = [1, 16, 64, 128]
SPLITS = [1, 2, 4, 8, 16]


def _weight(out_f, in_f, device, dtype):
    """A 2:4-pruned random weight, its sm90 compressed form, and the generator that made it (seed 0)."""
    import wanda_kernels as wk

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g, device=device, dtype=dtype)
    wk.prune_(w, torch.rand(in_f, generator=g, device=device) + 0.1, pattern="2:4")
    values, meta = wk.compress_24(w, meta_format="sm90")
    return w, values, meta, g


class _Case:
    """One (weight, tokens) point: the input, its fp32 reference and error bound, and a timer.

    Decode sizes (<= GRAPH_MAX_TOKENS) are timed as CUDA-graph replays rotating through
    copies of the weight larger than L2 (``vals``, ``ws``), larger ones with do_bench.
    ``dense_ms`` is cuBLAS on the same weight.
    """

    def __init__(self, w, values, tokens, device, dtype, generator=None):
        self.device = device
        self.x = torch.randn(tokens, w.shape[1], generator=generator, device=device, dtype=dtype)
        self.ref = F.linear(self.x.float(), w.float())
        self.bound = 2 * float((F.linear(self.x, w).float() - self.ref).abs().max()) + 1e-3
        self.graph = tokens <= GRAPH_MAX_TOKENS
        n = rotation_copies(values.numel() * values.element_size() * 5 // 4, device) if self.graph else 1
        self.vals = [values] + [values.clone() for _ in range(n - 1)]
        ws = [w] + [w.clone() for _ in range(n - 1)]
        self.timing = "cuda-graph replay, weights rotated past L2" if self.graph else "do_bench median"
        self.dense_ms = self.timed([lambda w=w_: F.linear(self.x, w) for w_ in ws])

    def timed(self, fns) -> float:
        return graph_ms(fns, self.device) if self.graph else bench_ms(fns[0], self.device)

    def check_and_time(self, y, launch) -> tuple[float | None, str | None]:
        """``(ms, None)`` for ``launch(values)`` writing ``y``, checked against the reference
        first, or ``(None, why)`` when its output is wrong or it fails."""
        try:
            y.fill_(float("nan"))
            launch(self.vals[0])
            err = float((y.float() - self.ref).abs().max())
            if not err <= self.bound:
                return None, f"max error {err:.3g} > {self.bound:.3g}"
            return self.timed([lambda v=v: launch(v) for v in self.vals]), None
        except (RuntimeError, ValueError) as exc:
            return None, str(exc)[:200]


def _schedule_row(case, meta, x, y, shape, dtype_name, config, schedules) -> dict:
    """One (shape, tokens, config) row: cuBLAS, decode where graph-timed, and every schedule, each checked first."""
    from wanda_kernels.gemm24 import launch_sm90

    tokens, (out_f, in_f) = x.shape[0], (y.shape[1], x.shape[1])
    row = dict(shape=shape, out_features=out_f, in_features=in_f, tokens=tokens, dtype=dtype_name, config=config,
               dense_ms=case.dense_ms, timing=case.timing)
    if config != "decode" and case.graph:
        row["decode_ms"] = case.timed([lambda v=v: launch_sm90(v, meta, x, y, None, "decode") for v in case.vals])
    times = {}
    for sched in schedules:
        key = f"swizzle={sched.swizzle},raster={sched.raster},splits={sched.splits}"
        ms, error = case.check_and_time(y, lambda v, s=sched: launch_sm90(v, meta, x, y, None, config, s))
        if error:
            row[f"error {key}"] = error
        else:
            times[key] = ms
    row["schedule_ms"] = times
    if times:
        default = times.get("swizzle=1,raster=heuristic,splits=1")
        best = min(times, key=times.get)
        row.update(best=best, best_ms=times[best], default_ms=default, best_vs_dense=row["dense_ms"] / times[best])
        log.info("%-12s %5d tok %-7s dense %8.1f us  default %8.1f  best %8.1f (%s)  %.2fx dense", shape, tokens,
                 config, row["dense_ms"] * 1e3, (default or float("nan")) * 1e3, times[best] * 1e3, best,
                 row["best_vs_dense"])
    return row


def schedule_sweep(device, dtype, dtype_name, save) -> list[dict]:
    """Rows of (shape, tokens, config) with cuBLAS and every schedule's time, each output checked first.

    ``save(rows)`` is called after each shape, so that a run cut short keeps what it measured.
    """
    from wanda_kernels.gemm24 import SM90_RASTERS, Sm90Schedule

    big = [Sm90Schedule(swizzle, raster) for raster in SM90_RASTERS for swizzle in (1, 2, 4, 8)]
    # Per token count, the configurations swept there: they share one input, reference and
    # cuBLAS time.
    plan = [(t, [("large", big), ("wide", big)]) for t in SCHEDULE_TOKENS]
    plan += [(t, [("streamk", [Sm90Schedule(splits=n) for n in SPLITS])]) for t in SPLITK_TOKENS]
    rows = []
    for model, layers in LLAMA_SHAPES.items():
        for layer, (out_f, in_f) in layers.items():
            w, values, meta, _ = _weight(out_f, in_f, device, dtype)
            for tokens, runs in plan:
                case = _Case(w, values, tokens, device, dtype)
                x, y = case.x, torch.empty(tokens, out_f, device=device, dtype=dtype)
                rows += [_schedule_row(case, meta, x, y, f"{model} {layer}", dtype_name, config, schedules)
                         for config, schedules in runs]
                del case
            save(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--out-dir", default=None)
    p.add_argument("--schedules", action="store_true", help="sweep the persistent schedules (tile order, split-K) "
                   "instead of the configurations")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("tune_sm90.py needs a compute capability 9.0 GPU (H100/H200)", file=sys.stderr)
        return 2
    from wanda_kernels.gemm24 import SM90_CONFIGS, launch_sm90, sm90_built

    if not sm90_built():
        print("this build of wanda_kernels._C has no sm90a kernels", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    if args.schedules:
        env = environment(device)
        written: list = [None]  # this run's file, once the first shape is written

        def save(rows):
            written[0] = write_results(f"tune_sm90_schedules_{args.dtype}", env, rows, args.out_dir, path=written[0])
            return written[0]

        print(f"wrote {save(schedule_sweep(device, dtype, args.dtype, save))}")
        return 0
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w, values, meta90, g = _weight(out_f, in_f, device, dtype)
        for tokens in args.tokens:
            case = _Case(w, values, tokens, device, dtype, generator=g)
            x, y = case.x, torch.empty(tokens, out_f, device=device, dtype=dtype)
            row = dict(shape=name, out_features=out_f, in_features=in_f, tokens=tokens, dtype=args.dtype,
                       timing=case.timing, dense_ms=case.dense_ms)
            for cfg in SM90_CONFIGS:
                ms, error = case.check_and_time(y, lambda v, cfg=cfg: launch_sm90(v, meta90, x, y, None, cfg))
                if error:
                    row[f"{cfg}_error"] = error
                else:
                    row[f"{cfg}_ms"] = ms
            timed_cfgs = [c for c in SM90_CONFIGS if f"{c}_ms" in row]
            row["best"] = min(timed_cfgs, key=lambda c: row[f"{c}_ms"]) if timed_cfgs else None
            if row["best"]:
                row["best_speedup"] = row["dense_ms"] / row[f"{row['best']}_ms"]
            rows.append(row)
            log.info("%-11s %5d tok  dense %8.1f us  %s  -> %s (%.2fx)", name, tokens, row["dense_ms"] * 1e3,
                     "  ".join(f"{c} {row[f'{c}_ms'] * 1e3:8.1f}" if f"{c}_ms" in row else f"{c} ERR"
                               for c in SM90_CONFIGS), row["best"], row.get("best_speedup", 0))
            del case
    env = environment(device)
    env["host_us_per_call"] = host_overhead(device, dtype)
    log.info("host time per call (us, 4096x4096, 1 token, synchronised every 200 calls): %s", env["host_us_per_call"])
    path = write_results(f"tune_sm90_{args.dtype}", env, rows, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
