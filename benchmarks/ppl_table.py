"""Paper-style perplexity table: ``python benchmarks/ppl_table.py``

Dense, magnitude (per layer), Wanda and SparseGPT at unstructured 50%, 4:8 and 2:4 on the
built-in SmolLM2-135M-Instruct, calibrated on the Austen novels other than Emma and
evaluated on Emma (non-overlapping windows), with the pruning time of each run.
Writes a new ``benchmarks/results/ppl_table_<device>_<date>.json`` and ``.md`` (earlier runs, such as the
committed results the README cites, are never overwritten).
"""

from __future__ import annotations

import argparse
import logging
import sys

from _common import add_protocol_args, environment, load_protocol, protocol_info, write_results

log = logging.getLogger("ppl_table")

PATTERNS = [("unstructured", "50%"), ("4:8", "4:8"), ("2:4", "2:4")]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from wanda_kernels.llm import evaluate, pipeline

    device, dtype, model, tok, calib, windows = load_protocol(args)
    log.info("%s on %s (%s): calibration %d x %d tokens, evaluation %d tokens of Emma", type(model).__name__, device,
             dtype, *calib.shape, windows.numel())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    rows = [dict(method="dense", pattern="-", perplexity=evaluate.perplexity(model, windows, progress=False),
                 prune_seconds=None)]
    log.info("dense: %.2f", rows[0]["perplexity"])
    for pattern, label in PATTERNS:
        for method in METHODS:
            model.load_state_dict(original)
            report = pipeline.prune_model(model, calib, pattern=pattern, method=method, progress=False)
            ppl = evaluate.perplexity(model, windows, progress=False)
            rows.append(dict(method=method, pattern=label, perplexity=ppl, prune_seconds=report.total_seconds,
                             forward_seconds=report.forward_seconds, select_seconds=report.prune_seconds,
                             sparsity=report.overall_sparsity()))
            log.info("%s %s: %.2f (pruned in %.1f s)", method, label, ppl, report.total_seconds)

    env = environment(device)
    env.update(dtype=str(dtype), **protocol_info(args, windows, "ppl_table.py", argv))
    path = write_results("ppl_table", env, rows, args.out_dir)
    md = _markdown(rows, env)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _markdown(rows, env) -> str:
    by = {(r["method"], r["pattern"]): r for r in rows}
    head = "| method | " + " | ".join(label for _, label in PATTERNS) + " |"
    lines = [head, "|---|" + "---:|" * len(PATTERNS)]
    lines.append(f"| dense | {by[('dense', '-')]['perplexity']:.2f} |" + " |" * (len(PATTERNS) - 1))
    for method in METHODS:
        cells = [f"{by[(method, label)]['perplexity']:.2f} ({by[(method, label)]['prune_seconds']:.1f} s)"
                 for _, label in PATTERNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    note = (f"\nPerplexity on {env['eval_tokens']} tokens of Emma (windows of {env['seqlen']}), calibration "
            f"{env['nsamples']} x {env['seqlen']} tokens; (pruning time). {env['device_name']}, {env['dtype']}, "
            f"torch {env['torch']}.\n")
    return "\n".join(lines) + "\n" + note
if __name__ == "__main__":
    sys.exit(main())
