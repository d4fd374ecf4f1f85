"""Every Triton kernel variant compiles to a cubin for sm_80 and sm_90 (no GPU needed).

The interpreter executes kernels in numpy and so never runs Triton's code generator;
this test does, in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")
ROOT = SCRIPT.parent.parent


def test_all_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Import the package the tests import (the checkout, or the installed copy).
    import wanda_kernels

    env["PYTHONPATH"] = os.pathsep.join([str(Path(wanda_kernels.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), "80", "90"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {(r["kernel"], r["arch"]) for r in rows}
    for name in ("wanda_mask_kernel", "wanda_nm_mask_kernel", "sq_norms_kernel", "prune_compress_24_kernel",
                 "bitmap_linear_kernel"):
        assert {(name, 80), (name, 90)} <= kernels
    # archs x (dtypes x (4 unstructured + 5 N:M mask variants, RIA's among them, + norms)
    #          + 16-bit dtypes x (2:4 layouts + bitmap launch configurations))
    assert len(rows) == 2 * (3 * (4 + 5 + 1) + 2 * (2 + 5))
    assert all(r["cubin_bytes"] > 0 and r["ptx_bytes"] > 0 for r in rows)
