"""Every 2:4 GEMM kernel of wanda_kernels._C and the bitmap kernel on odd and LLaMA-like shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/memcheck_sparse24.py

Without the caching allocator every tensor is its own cudaMalloc, so a read or write
past a tensor's end lands outside any allocation and memcheck reports it (inside one
of the allocator's large blocks it would be invisible).

Shapes that are not multiples of the kernels' tiles go through ``SparseLinear.from_dense``
padding, as in the product. Both dtypes, every sm90a configuration on compute capability
9.0 and the sm80 kernel where it runs, with and without bias; the Triton bitmap kernel
(``BitmapLinear``, 50% unstructured) unsplit and with K split in two. Exits non-zero on a wrong
result (against F.linear in fp32) and when a kernel it should have launched was not
launched, so exit 0 plus a clean memcheck log means every named kernel ran cleanly.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import wanda_kernels as wk
from wanda_kernels.bitmap_op import kernel_linear as bitmap_kernel_linear
from wanda_kernels.gemm24 import SM90_CONFIGS, Sm90Schedule, launch_sm80, launch_sm90, runs_on, sm80_tokens, sm90_built

SHAPES = [(104, 192), (100, 200), (1024, 4096), (4096, 4096)]
TOKENS = [1, 13, 200]
# Besides each configuration's default schedule: split-K (its own workspace reduction)
# and swizzled rasters, whose tile walks differ from the default's.
SM90_RUNS = [(cfg, None) for cfg in SM90_CONFIGS] + [
    ("streamk", Sm90Schedule(splits=4)), ("large", Sm90Schedule(2, "along_m")), ("wide", Sm90Schedule(8, "along_n"))]


def _run_name(cfg: str, schedule) -> str:
    return cfg if schedule is None else f"{cfg}/{schedule.swizzle}/{schedule.raster}/{schedule.splits}"


def expected_kernels(cc) -> set[str]:
    names = set()
    if cc == (9, 0) and sm90_built():
        names |= {f"sm90 {_run_name(*run)} {dt}" for run in SM90_RUNS for dt in ("float16", "bfloat16")}
    if cc[0] in (8, 9) and runs_on(*cc):
        names |= {f"sm80 {dt}" for dt in ("float16", "bfloat16")}
    names |= {f"bitmap splits={s} {dt}" for s in (1, 2) for dt in ("float16", "bfloat16")}
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one odd and one aligned shape, 1 and 13 tokens")
    p.add_argument("--cpu-reference", action="store_true",
                   help="compute the F.linear references on the CPU, so that no cuBLAS kernel runs under the "
                        "sanitizer (racecheck reports hazards inside cuBLAS's split-K kernels, not ours)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("memcheck_sparse24.py needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes, tokens = (SHAPES[:1] + SHAPES[2:3], TOKENS[:2]) if args.quick else (SHAPES, TOKENS)
    cc = torch.cuda.get_device_capability()
    expected = expected_kernels(cc)
    launched: set[str] = set()
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        dt = str(dtype).replace("torch.", "")
        for out_f, in_f in shapes:
            g = torch.Generator(device="cuda").manual_seed(out_f + in_f)
            w = torch.randn(out_f, in_f, generator=g, device="cuda", dtype=dtype)
            wk.prune_(w, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
            bias = torch.randn(out_f, generator=g, device="cuda", dtype=dtype)
            sl = wk.SparseLinear.from_dense(w, bias)  # pads M and K to the kernels' multiples
            wu = torch.randn(out_f, in_f, generator=g, device="cuda", dtype=dtype)
            wk.prune_(wu, torch.rand(in_f, generator=g, device="cuda") + 0.1, 0.5)
            bl = wk.BitmapLinear.from_dense(wu, bias)
            values, m_pad = sl.values, sl.values.shape[0]
            for n in tokens:
                x = torch.randn(n, in_f, generator=g, device="cuda", dtype=dtype)
                xk = F.pad(x, (0, 2 * values.shape[1] - in_f))  # K padded with zeros, as SparseLinear does
                runs = []
                if f"sm90 decode {dt}" in expected:
                    meta90 = sl.meta_as("sm90")
                    m8 = -(-out_f // 8) * 8  # sm90 output rows: a multiple of 8
                    bias8 = F.pad(bias, (0, m8 - out_f))
                    for cfg, schedule in SM90_RUNS:
                        for b in (None, bias8):
                            y = torch.full((n, m8), float("nan"), device="cuda", dtype=dtype)
                            launch_sm90(values, meta90, xk, y, b, cfg, schedule)
                            runs.append((f"sm90 {_run_name(cfg, schedule)} {dt}", b is not None, y[:, :out_f], w))
                if f"sm80 {dt}" in expected:
                    n8 = sm80_tokens(n)
                    xb = F.pad(xk, (0, 0, 0, n8 - n))
                    d = torch.full((m_pad, n8), float("nan"), device="cuda", dtype=dtype)
                    launch_sm80(values, sl.meta_as("sm80"), xb, d)
                    runs.append((f"sm80 {dt}", False, d[:out_f, :n].t(), w))
                for splits in (1, 2):
                    y = bitmap_kernel_linear(x, bl.values, bl.bitmap, bl.chunks, bias, splits=splits)
                    runs.append((f"bitmap splits={splits} {dt}", True, y, wu))
                ref_dev = torch.device("cpu") if args.cpu_reference else x.device
                xr, br = x.to(ref_dev), bias.to(ref_dev)
                for name, with_bias, y, weight in runs:
                    launched.add(name)
                    wr = weight.to(ref_dev)
                    b = br if with_bias else None
                    ref = F.linear(xr.float(), wr.float(), None if b is None else b.float())
                    err = float((y.to(ref_dev).float() - ref).abs().max())
                    bound = 2 * float((F.linear(xr, wr, b).float() - ref).abs().max()) + 1e-6
                    ok = err <= bound  # False for NaN: an unwritten output fails
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {name:36s} bias={with_bias!s:5} {out_f}x{in_f} n={n}: "
                          f"err {err:.3g} (bound {bound:.3g})", flush=True)
    torch.cuda.synchronize()
    missing = expected - launched
    if missing:
        print(f"FAIL: never launched: {sorted(missing)}", file=sys.stderr)
    print(f"launched {len(launched)} kernels: {sorted(launched)}; {failures} wrong results")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
