"""Compile every Triton kernel variant for sm_80 and sm_90 without a GPU.

Run as a script (the tests call it in a subprocess): TRITON_INTERPRET must be unset,
because the interpreter replaces triton.language's code generator process-wide.
Triton's own ptxas turns the PTX into a cubin, so this catches everything up to
register allocation that a real launch would hit: type errors in loops, unsupported
ops, shapes. Prints one JSON line per compiled variant.
"""

import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_compile.py must run with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wanda_kernels.bitmap import CHUNK_COLS  # noqa: E402
from wanda_kernels.kernels import act_norms, bitmap_matmul, prune_compress, wanda_mask  # noqa: E402

TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def variants():
    strides = {"stride_wr": "i64", "stride_wc": "i64", "stride_mr": "i64"}
    for dt in ("fp16", "bf16", "fp32"):
        ria = {"row_inv_ptr": "*fp32", "col_inv_ptr": "*fp32"}
        for block_n, use_norms, relative, write_mask in ((256, True, False, True), (4096, False, False, False),
                                                         (16384, True, False, False), (4096, True, True, True)):
            sig = {"w_ptr": f"*{dt}", "norms_ptr": "*fp32", **ria, "mask_ptr": "*u8", "n_cols": "i32",
                   "k_prune": "i32", **strides}
            const = {"USE_NORMS": use_norms, "RELATIVE": relative, "WRITE_WEIGHT": True, "WRITE_MASK": write_mask,
                     "BLOCK_N": block_n}
            yield "wanda_mask_kernel", wanda_mask.wanda_mask_kernel, sig, const, wanda_mask._num_warps(block_n)
        for n, m, relative in ((2, 4, False), (4, 8, False), (1, 3, False), (16, 32, False), (2, 4, True)):
            m_pad = triton.next_power_of_2(m)
            sig = {"w_ptr": f"*{dt}", "norms_ptr": "*fp32", **ria, "mask_ptr": "*u8", "n_cols": "i32", **strides}
            const = {"N": n, "M": m, "M_PAD": m_pad, "BLOCK_G": max(1, 4096 // (m_pad * m_pad)),
                     "USE_NORMS": True, "RELATIVE": relative, "WRITE_WEIGHT": True, "WRITE_MASK": True}
            yield "wanda_nm_mask_kernel", wanda_mask.wanda_nm_mask_kernel, sig, const, 4
        sig = {"x_ptr": f"*{dt}", "partial_ptr": "*fp32", "n_tokens": "i32", "n_cols": "i32",
               "stride_xt": "i64", "stride_xc": "i64"}
        const = {"BLOCK_T": act_norms._BLOCK_T, "BLOCK_C": act_norms._BLOCK_C, "ITERS": act_norms._MAX_ITERS}
        yield "sq_norms_kernel", act_norms.sq_norms_kernel, sig, const, 4
        if dt != "fp32":  # the 2:4 format is for 16-bit weights
            sig = {"w_ptr": f"*{dt}", "norms_ptr": "*fp32", "values_ptr": "*i16", "meta_ptr": "*i16",
                   "n_rows": "i32", "e_rows": "i32", "n_cols": "i32", "stride_wr": "i64", "stride_wc": "i64"}
            for meta_sm90 in (False, True):
                const = {"USE_NORMS": True, "META_SM90": meta_sm90, "BLOCK_E": prune_compress._BLOCK_E}
                yield "prune_compress_24_kernel", prune_compress.prune_compress_24_kernel, sig, const, 4
            # Every launch configuration (token regimes 1, 2, 3-4, 5-16, more), split and not.
            for tokens, split in ((1, True), (2, True), (4, False), (16, True), (64, False)):
                cfg = dict(bitmap_matmul.config_for(tokens))
                warps = cfg.pop("num_warps")
                sig = {"x_ptr": f"*{dt}", "values_ptr": f"*{dt}", "bitmap_ptr": "*i32", "chunks_ptr": "*i32",
                       "bias_ptr": f"*{dt}", "y_ptr": "*fp32" if split else f"*{dt}", "n_tokens": "i32",
                       "n_rows": "i32", "n_cols": "i32", "chunks_per_split": "i32", "stride_xt": "i64",
                       "stride_xk": "i64", "stride_br": "i64", "stride_cr": "i64"}
                const = {"HAS_BIAS": not split, "SPLIT_OUT": split, "DOT_IN_FP32": False, **cfg,
                         "ITERS": CHUNK_COLS // cfg["BLOCK_K"], "CHUNK": CHUNK_COLS}
                yield "bitmap_linear_kernel", bitmap_matmul.bitmap_linear_kernel, sig, const, warps


def main():
    archs = [int(a) for a in (sys.argv[1:] or ["80", "90"])]
    for name, kernel, sig, const, num_warps in variants():
        signature = {**sig, **{k: "constexpr" for k in const}}
        for arch in archs:
            t0 = time.perf_counter()
            compiled = triton.compile(
                ASTSource(kernel, signature=signature, constexprs=const),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": num_warps},
            )
            print(json.dumps({
                "kernel": name, "arch": arch, "signature": sig, "constexprs": const, "num_warps": num_warps,
                "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"]),
                "seconds": round(time.perf_counter() - t0, 2), "triton": triton.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
