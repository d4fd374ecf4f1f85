"""Run every 2:4 GEMM kernel of wanda_kernels._C once per shape, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/memcheck_sparse24.py

Small LLaMA-like and odd shapes, both dtypes, every sm90a configuration on compute
capability 9.0 and the sm80 kernel where it runs, with and without bias; exits non-zero
on a wrong result (against F.linear in fp32), so a clean memcheck log plus exit 0 means
no out-of-bounds access on these shapes.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import wanda_kernels as wk
from wanda_kernels._ext import runs_on, sm90_built
from wanda_kernels.sparse24 import meta_sm80_to_sm90
from wanda_kernels.sparse_linear import launch_sparse24_gemm, launch_sparse24_sm90

SHAPES = [(104, 192), (4096, 4096), (1024, 4096)]
TOKENS = [1, 13, 200]


def main() -> int:
    if not torch.cuda.is_available():
        print("memcheck_sparse24.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cc = torch.cuda.get_device_capability()
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for out_f, in_f in SHAPES:
            g = torch.Generator(device="cuda").manual_seed(out_f + in_f)
            w = torch.randn(out_f, in_f, generator=g, device="cuda", dtype=dtype)
            wk.prune_(w, torch.rand(in_f, generator=g, device="cuda") + 0.1, pattern="2:4")
            bias = torch.randn(out_f, generator=g, device="cuda", dtype=dtype)
            values, meta = wk.compress_24(w)
            for n in TOKENS:
                x = torch.randn(n, in_f, generator=g, device="cuda", dtype=dtype)
                runs = []
                if cc == (9, 0) and sm90_built():
                    meta90 = meta_sm80_to_sm90(meta, out_f, in_f)
                    for cfg in ("decode", "large", "streamk"):
                        for b in (None, bias):
                            y = torch.empty(n, out_f, device="cuda", dtype=dtype)
                            launch_sparse24_sm90(values, meta90, x, y, b, cfg)
                            runs.append((f"sm90 {cfg} bias={b is not None}", y, b))
                if cc[0] in (8, 9) and runs_on(*cc) and n % 8 == 0:
                    d = torch.empty(out_f, n, device="cuda", dtype=dtype)
                    launch_sparse24_gemm(values, meta, x, d)
                    runs.append(("sm80", d.t(), None))
                for name, y, b in runs:
                    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
                    err = float((y.float() - ref).abs().max())
                    bound = 2 * float((F.linear(x, w, b).float() - ref).abs().max()) + 1e-6
                    ok = err <= bound
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {name:24s} {dtype} {out_f}x{in_f} n={n}: err {err:.3g} "
                          f"(bound {bound:.3g})")
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
