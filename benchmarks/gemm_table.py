"""The README's 2:4 GEMM tables from a ``gemm_2to4.py`` result: ``python benchmarks/gemm_table.py RESULT.json``

Prints, per dtype, one Markdown table of ``SparseLinear``'s speedup over cuBLAS (graph
replays up to 128 tokens, as measured), PyTorch's best 2:4 backend's in brackets, and
the sm90a configuration the dispatch rule picks for that shape. Reads the JSON only;
needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tables(result: dict) -> str:
    from wanda_kernels.gemm24.policy import sm90_config_for

    env, rows = result["environment"], result["results"]
    sms = env.get("sm_count") or env.get("multiprocessors") or 132
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sel = [r for r in rows if r["dtype"] == dtype]
        tokens = sorted({r["tokens"] for r in sel})
        layers = list(dict.fromkeys((r["model"], r["layer"], r["out_features"], r["in_features"]) for r in sel))
        out.append(f"{dtype}: SparseLinear time / cuBLAS time as a speedup (PyTorch's best 2:4 backend's in "
                   "brackets), the dispatch's configuration below\n")
        out.append("| layer (out × in) | " + " | ".join(f"{t} tok" for t in tokens) + " |")
        out.append("|---|" + "---:|" * len(tokens))
        for model, layer, out_f, in_f in layers:
            cells = []
            for t in tokens:
                r = next((r for r in sel if (r["model"], r["layer"], r["tokens"]) == (model, layer, t)), None)
                if r is None or r.get("speedup_ours") is None:
                    cells.append("–")
                    continue
                torch_speedup = r.get("speedup_torch")
                bracket = f" ({torch_speedup:.2f}×)" if torch_speedup else ""
                cells.append(f"**{r['speedup_ours']:.2f}×**{bracket} {sm90_config_for(t, out_f, sms)}")
            out.append(f"| {model} {layer} ({out_f}×{in_f}) | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", type=Path, help="a gemm_2to4_<gpu>.json written by benchmarks/gemm_2to4.py")
    args = p.parse_args(argv)
    print(tables(json.loads(args.result.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
