"""Launch parameters of the Wanda mask kernels: ``python benchmarks/tune_mask.py``

Times the unstructured kernel over ``num_warps`` and the N:M kernel over ``num_warps``
and groups per program, on LLaMA row lengths, with a device copy of the same weight as
the bandwidth yardstick in the same run. Each variant's mask is checked bit for bit
against the torch path before it is timed. The launchers' choices in
``wanda_kernels/kernels/wanda_mask.py`` are read off this output; the JSON keeps the
raw times. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import triton

from _common import bench_ms, environment, gbps, write_results

log = logging.getLogger("tune_mask")

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        print("tune_mask.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import wanda_kernels as wk
    from wanda_kernels import reference
    from wanda_kernels.kernels.wanda_mask import wanda_mask_kernel, wanda_nm_mask_kernel

    device = torch.device("cuda")
    rows = []
    for out_f, in_f in SHAPES:
        g = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g, device=device).half()
        norms = (torch.rand(in_f, generator=g, device=device) + 0.1).abs().contiguous()
        mask = torch.empty(out_f, in_f, dtype=torch.bool, device=device)
        wt = w.clone()  # pruned in place while timing
        moved = 2 * w.numel() * 2 + 4 * in_f  # read W and norms, write W (the mask is off while timing)
        dst = torch.empty_like(w)
        copy = gbps(2 * w.numel() * 2, bench_ms(lambda: dst.copy_(w), device))  # noqa: B023
        k = reference.num_pruned(in_f, 0.5)
        block_n = triton.next_power_of_2(in_f)
        expect = wk.prune_mask(w, norms, 0.5, backend="torch")
        for nw in (1, 2, 4, 8, 16, 32):
            if block_n // (32 * nw) > 128:  # more than 128 keys per thread: skip, it would spill heavily
                continue

            def unstructured(write_mask=False, nw=nw):
                # Timed as prune_ runs it: pruning a copy in place (idempotent: the pruned
                # zeros score lowest again). Checked once on the mask output.
                wanda_mask_kernel[(out_f,)](w if write_mask else wt, norms, norms, norms, mask.view(torch.uint8), in_f,
                                             k, w.stride(0), w.stride(1), mask.stride(0), USE_NORMS=True,
                                             RELATIVE=False,
                                             WRITE_WEIGHT=not write_mask, WRITE_MASK=write_mask, BLOCK_N=block_n,
                                             num_warps=nw)

            unstructured(True)
            ok = torch.equal(mask, expect)
            ms = bench_ms(unstructured, device) if ok else None
            rows.append(dict(kernel="unstructured", out_features=out_f, in_features=in_f, num_warps=nw, ok=ok,
                             ms=ms, gbps=gbps(moved, ms) if ms else None, copy_gbps=copy,
                             pct_of_copy=100 * gbps(moved, ms) / copy if ms else None))
            log.info("unstructured %5dx%-5d warps %2d: %s", out_f, in_f, nw,
                     f"{ms * 1e3:8.1f} us {rows[-1]['pct_of_copy']:5.1f}% of copy" if ok else "WRONG MASK")
        for n, m in ((2, 4), (4, 8)):
            expect = wk.prune_mask(w, norms, pattern=f"{n}:{m}", backend="torch")
            m_pad = triton.next_power_of_2(m)
            for block_g in (32, 64, 128, 256):
                for nw in (2, 4, 8):
                    grid = (out_f, triton.cdiv(in_f // m, block_g))

                    def nm_kernel(write_mask=False, nw=nw, block_g=block_g, grid=grid, n=n, m=m, m_pad=m_pad):
                        wanda_nm_mask_kernel[grid](w if write_mask else wt, norms, norms, norms, mask.view(torch.uint8),
                                                    in_f, w.stride(0), w.stride(1), mask.stride(0), N=n, M=m,
                                                    M_PAD=m_pad, BLOCK_G=block_g, USE_NORMS=True, RELATIVE=False,
                                                    WRITE_WEIGHT=not write_mask,
                                                    WRITE_MASK=write_mask, num_warps=nw)

                    nm_kernel(True)
                    ok = torch.equal(mask, expect)
                    ms = bench_ms(nm_kernel, device) if ok else None
                    rows.append(dict(kernel=f"{n}:{m}", out_features=out_f, in_features=in_f, num_warps=nw,
                                     block_g=block_g, ok=ok, ms=ms, gbps=gbps(moved, ms) if ms else None,
                                     copy_gbps=copy, pct_of_copy=100 * gbps(moved, ms) / copy if ms else None))
            best = min((r for r in rows if r["kernel"] == f"{n}:{m}" and r["in_features"] == in_f
                        and r["out_features"] == out_f and r["ms"]), key=lambda r: r["ms"], default=None)
            if best:
                log.info("%s %5dx%-5d best: block_g %d warps %d: %.1f us %.1f%% of copy", f"{n}:{m}", out_f, in_f,
                         best["block_g"], best["num_warps"], best["ms"] * 1e3, best["pct_of_copy"])
    path = write_results("tune_mask", environment(device), rows, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
