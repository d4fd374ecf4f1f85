"""Perplexity table: ``python benchmarks/ppl_table.py``

Dense, magnitude (per layer), Wanda, SparseGPT, and Wanda/SparseGPT with each mask
switch of ``prune_model`` (RIA scores, DSnoT refinement, OWL layer-wise sparsity, N:M
channel permutation) and their combinations, at unstructured 50%, 60%, 70%, 4:8 and 2:4,
on the built-in SmolLM2-135M-Instruct: calibrated on the Austen novels other than Emma
(seed 0), evaluated on Emma (non-overlapping windows), with the pruning time of each run
and its ratio to the plain method it modifies (same column, same run).

Writes a new ``benchmarks/results/ppl_table_<device>_<date>.json``, ``.md`` and ``.png``
(perplexity against sparsity per method); earlier runs, such as the committed results the
README cites, are never overwritten. The JSON is rewritten after every case, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from _common import add_protocol_args, environment, load_protocol, protocol_info, pyplot, write_results

log = logging.getLogger("ppl_table")

# (label, pattern, sparsity)
PATTERNS = [("50%", "unstructured", 0.5), ("60%", "unstructured", 0.6), ("70%", "unstructured", 0.7),
            ("4:8", "4:8", None), ("2:4", "2:4", None)]
UNSTRUCTURED, NM = "unstructured", "N:M"
# (label, method, prune_model options, which patterns it applies to: None = all)
VARIANTS = [
    ("magnitude", "magnitude", {}, None),
    ("wanda", "wanda", {}, None),
    ("wanda +RIA", "wanda", dict(metric="ria"), None),
    ("wanda +DSnoT", "wanda", dict(dsnot=True), None),
    ("wanda +OWL", "wanda", dict(owl=True), UNSTRUCTURED),
    ("wanda +permute", "wanda", dict(permute=True), NM),
    ("wanda +RIA +DSnoT", "wanda", dict(metric="ria", dsnot=True), None),
    ("wanda +RIA +DSnoT +OWL", "wanda", dict(metric="ria", dsnot=True, owl=True), UNSTRUCTURED),
    ("wanda +RIA +DSnoT +permute", "wanda", dict(metric="ria", dsnot=True, permute=True), NM),
    ("sparsegpt", "sparsegpt", {}, None),
    ("sparsegpt +OWL", "sparsegpt", dict(owl=True), UNSTRUCTURED),
    ("sparsegpt +permute", "sparsegpt", dict(permute=True), NM),
]


def applies(kind: str | None, pattern: str) -> bool:
    return kind is None or (kind == UNSTRUCTURED) == (pattern == "unstructured")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p)
    p.add_argument("--patterns", nargs="+", default=[label for label, *_ in PATTERNS],
                   choices=[label for label, *_ in PATTERNS], help="columns to run (default: all)")
    p.add_argument("--variants", nargs="+", default=[label for label, *_ in VARIANTS],
                   choices=[label for label, *_ in VARIANTS], help="rows to run (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from wanda_kernels.llm import evaluate, pipeline

    device, dtype, model, tok, calib, windows = load_protocol(args)
    log.info("%s on %s (%s): calibration %d x %d tokens, evaluation %d tokens of Emma", type(model).__name__, device,
             dtype, *calib.shape, windows.numel())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    env = environment(device)
    env.update(dtype=str(dtype), **protocol_info(args, windows, "ppl_table.py", argv))

    t_run = time.perf_counter()
    rows = [dict(method="dense", pattern="-", perplexity=evaluate.perplexity(model, windows, progress=False),
                 prune_seconds=None)]
    log.info("dense: %.2f", rows[0]["perplexity"])
    path = write_results("ppl_table", env, rows, args.out_dir)
    for label, pattern, sparsity in PATTERNS:
        if label not in args.patterns:
            continue
        for name, method, options, kind in VARIANTS:
            if name not in args.variants or not applies(kind, pattern):
                continue
            model.load_state_dict(original)
            report = pipeline.prune_model(model, calib, sparsity, pattern=pattern, method=method, progress=False,
                                          **options)
            ppl = evaluate.perplexity(model, windows, progress=False)
            rows.append(dict(method=name, base_method=method, options=report.options, pattern=label, perplexity=ppl,
                             prune_seconds=report.total_seconds, forward_seconds=report.forward_seconds,
                             select_seconds=report.prune_seconds, owl_seconds=report.owl_seconds,
                             sparsity=_weighted_sparsity(model, pipeline), layer_targets=report.layer_targets,
                             permuted_layers=len(report.permutations), folded_layers=len(report.folded)))
            log.info("%s %s: %.2f (pruned in %.1f s)", name, label, ppl, report.total_seconds)
            path = write_results("ppl_table", env, _with_ratios(rows), path=path)
    env["run_seconds"] = time.perf_counter() - t_run
    rows = _with_ratios(rows)
    write_results("ppl_table", env, rows, path=path)
    md = _markdown(rows, env)
    path.with_suffix(".md").write_text(md)
    png = plot(rows, path.with_suffix(".png"))
    print(md)
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f" and {png}" if png else ""))
    return 0


def _weighted_sparsity(model, pipeline) -> float:
    """Zeros over all weights of the decoder layers' linears (OWL's target is this mean)."""
    _, layers = pipeline.find_decoder_layers(model)
    zeros = total = 0
    for layer in layers:
        for w in pipeline.prunable_weights(layer).values():
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


def _with_ratios(rows):
    """Each row's pruning time and perplexity over those of the plain method it modifies (same pattern)."""
    plain = {(r["method"], r["pattern"]): r for r in rows}
    for r in rows:
        base = plain.get((r.get("base_method"), r["pattern"]))
        if base is not None and r["prune_seconds"] is not None:
            r["time_vs_base"] = r["prune_seconds"] / base["prune_seconds"]
            r["ppl_vs_base"] = r["perplexity"] / base["perplexity"]
    return rows


def _markdown(rows, env) -> str:
    by = {(r["method"], r["pattern"]): r for r in rows}
    labels = [label for label, *_ in PATTERNS if any(r["pattern"] == label for r in rows)]
    head = "| method | " + " | ".join(labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]
    lines.append(f"| dense | {by[('dense', '-')]['perplexity']:.2f} |" + " |" * (len(labels) - 1))
    for name, *_ in VARIANTS:
        cells = []
        for label in labels:
            r = by.get((name, label))
            if r is None:
                cells.append("")
                continue
            ratio = f", {r['time_vs_base']:.2f}x" if "time_vs_base" in r and r["method"] != r["base_method"] else ""
            cells.append(f"{r['perplexity']:.2f} ({r['prune_seconds']:.1f} s{ratio})")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = (f"\nPerplexity on {env['eval_tokens']} tokens of Emma (windows of {env['seqlen']}), calibration "
            f"{env['nsamples']} x {env['seqlen']} tokens (seed 0, the other Austen novels); (pruning time, and for a "
            f"switch its ratio to the plain method in the same column). {env['device_name']}, {env['dtype']}, "
            f"torch {env['torch']}.\n")
    return "\n".join(lines) + "\n" + note


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return None
    dense = next(r["perplexity"] for r in rows if r["method"] == "dense")
    fig, (ax_u, ax_nm) = plt.subplots(1, 2, figsize=(13, 5), sharey=True, gridspec_kw=dict(width_ratios=[3, 2]))
    unstructured = [label for label, pattern, _ in PATTERNS if pattern == "unstructured"]
    nm = [label for label, pattern, _ in PATTERNS if pattern != "unstructured"]
    for i, (name, *_) in enumerate(VARIANTS):
        style = dict(marker="os^vD<>ph*XP"[i % 12], color=f"C{i % 10}", ls="--" if "sparsegpt" in name else "-")
        for ax, labels in ((ax_u, unstructured), (ax_nm, nm)):
            points = [(label, r["perplexity"]) for label in labels for r in rows
                      if r["method"] == name and r["pattern"] == label]
            if points:
                ax.plot([labels.index(p[0]) for p in points], [p[1] for p in points], label=name, **style)
    for ax, labels, title in ((ax_u, unstructured, "unstructured"), (ax_nm, nm, "N:M (50%)")):
        ax.axhline(dense, color="gray", lw=1, ls=":", label="dense" if ax is ax_u else None)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    ax_u.set_ylabel("perplexity on Emma (log)")
    ax_u.set_xlabel("sparsity")
    ax_nm.set_xlabel("pattern")
    fig.suptitle("SmolLM2-135M-Instruct: perplexity by pruning method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
