"""Launch, once each, the kernels whose targets the H100 run missed, for Nsight Compute.

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:'wanda|prune_compress|sq_norms|device_kernel' --csv --page details \\
        python3 tools/profile_targets.py > ncu.csv

Each kernel runs once after a warm-up call (Triton compiles on the first); ncu's
speed-of-light section then says for each whether compute or memory throughput
bounds it, and how far from either it is. Prints one line per launch so that the
CSV's rows can be matched to cases.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_targets.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import wanda_kernels as wk
    from wanda_kernels.gemm24 import launch_sm90, sm90_built

    g = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    w = torch.randn(4096, 4096, generator=g, device="cuda").half()
    norms = torch.rand(4096, generator=g, device="cuda") + 0.1
    cases.append(("wanda mask unstructured 50%, 4096x4096 fp16", lambda: wk.prune_(w.clone(), norms, 0.5)))
    cases.append(("wanda mask 2:4, 4096x4096 fp16", lambda: wk.prune_(w.clone(), norms, pattern="2:4")))
    cases.append(("wanda mask 4:8, 4096x4096 fp16", lambda: wk.prune_(w.clone(), norms, pattern="4:8")))
    w2 = torch.randn(4096, 11008, generator=g, device="cuda").half()
    n2 = torch.rand(11008, generator=g, device="cuda") + 0.1
    cases.append(("fused prune+compress 2:4, 4096x11008 fp16", lambda: wk.prune_compress_24(w2, n2)))
    x = torch.randn(8192, 4096, generator=g, device="cuda").half()
    sq = torch.zeros(4096, device="cuda")
    cases.append(("act-norms, 8192 tokens x 4096 fp16", lambda: wk.accumulate_sq_norms_(sq, x)))
    if torch.cuda.get_device_capability() == (9, 0) and sm90_built():
        for (out_f, in_f), tokens, cfg in (((8192, 28672), 8192, "wide"), ((1024, 8192), 1, "decode"),
                                            ((4096, 4096), 1, "decode"), ((4096, 4096), 2048, "wide")):
            wt = torch.randn(out_f, in_f, generator=g, device="cuda").half()
            wk.prune_(wt, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
            values, meta = wk.compress_24(wt, meta_format="sm90")
            xt = torch.randn(tokens, in_f, generator=g, device="cuda").half()
            y = torch.empty(tokens, out_f, device="cuda", dtype=torch.float16)
            cases.append((f"sm90 {cfg}, {out_f}x{in_f}, {tokens} tokens fp16",
                          lambda v=values, m=meta, xt=xt, y=y, cfg=cfg: launch_sm90(v, m, xt, y, None, cfg)))
    for name, fn in cases:
        fn()  # warm-up (Triton compiles here)
        torch.cuda.synchronize()
        print(f"case: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
