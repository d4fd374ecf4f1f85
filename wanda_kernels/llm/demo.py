"""The main job on the built-in model: dense vs magnitude vs Wanda (50% unstructured, 2:4), and the best 2:4 mask.

Library side of ``wanda-kernels demo``: runs the comparison, formats the table and
writes ``demo.json`` and ``demo.png``; the command (:mod:`.cli`) prints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import evaluate, pipeline

logger = logging.getLogger("wanda_kernels")

__all__ = ["DEMO_RUNS", "run_demo", "format_table", "write_results", "bar_chart"]

# (name, pattern, label, prune_model options); "dense" is the unpruned model. The last run
# is the best 2:4 mask without a weight update: RIA scores, channel permutation, DSnoT.
BEST_24 = dict(method="wanda", metric="ria", permute=True, dsnot=True)
DEMO_RUNS = [
    ("dense", None, "dense", None),
    ("magnitude", "unstructured", "magnitude 50%", dict(method="magnitude")),
    ("wanda", "unstructured", "wanda 50%", dict(method="wanda")),
    ("magnitude", "2:4", "magnitude 2:4", dict(method="magnitude")),
    ("wanda", "2:4", "wanda 2:4", dict(method="wanda")),
    ("wanda+RIA+perm+DSnoT", "2:4", "wanda+RIA+perm+DSnoT 2:4", BEST_24),
]


def run_demo(model: nn.Module, calib: torch.Tensor, windows: torch.Tensor, *, device: torch.device,
             on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Every run of :data:`DEMO_RUNS` from the same starting weights; one row per run.

    Args:
        model: the causal LM, on ``device``; its weights are restored after the last run.
        calib: ``(nsamples, seqlen)`` int64 calibration windows; windows: ``(n, seqlen)``
            int64 evaluation windows.
        on_result: called with each row as soon as its run finishes.

    Returns:
        ``[{"run", "method", "pattern", "perplexity", "prune_seconds"}]``.
    """
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    try:
        for method, pattern, label, options in DEMO_RUNS:
            model.load_state_dict(original)
            seconds = None
            if options is not None:
                report = pipeline.prune_model(model, calib, pattern=pattern, device=device, **options)
                seconds = report.total_seconds
            ppl = evaluate.perplexity(model, windows)
            row = {"run": label, "method": method, "pattern": pattern or "-", "perplexity": ppl,
                   "prune_seconds": seconds}
            logger.info("demo: %s perplexity %.2f", label, ppl)
            rows.append(row)
            if on_result is not None:
                on_result(row)
    finally:
        model.load_state_dict(original)
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(15, *(len(r["run"]) for r in rows))
    lines = [f"{'run':<{width}} {'perplexity':>11} {'prune time':>11}", "-" * (width + 24)]
    for r in rows:
        t = f"{r['prune_seconds']:.1f} s" if r["prune_seconds"] is not None else "-"
        lines.append(f"{r['run']:<{width}} {r['perplexity']:>11.2f} {t:>11}")
    return "\n".join(lines)


def write_results(rows: list[dict], out_dir, info: dict, title: str) -> tuple[Path, Path | None]:
    """``demo.json`` (``info`` plus the rows) and, with matplotlib, ``demo.png`` in ``out_dir``.

    ``title`` names the model and the text (e.g. ``"SmolLM2-135M-Instruct (135M) on Emma"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "demo.json"
    json_path.write_text(json.dumps({**info, "results": rows}, indent=1))
    return json_path, bar_chart(rows, out / "demo.png", title)


PATTERN_LABELS = {"unstructured": "50% unstructured", "2:4": "2:4 (50%)"}
METHOD_COLORS = {"magnitude": "tab:orange", "wanda": "tab:blue", "wanda+RIA+perm+DSnoT": "tab:green"}


def bar_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    """Perplexity per pruned run, grouped by pattern, dense as a reference line; log scale.

    None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dense = [r["perplexity"] for r in rows if r["method"] == "dense"]
    pruned = [r for r in rows if r["method"] != "dense"]
    patterns = list(dict.fromkeys(r["pattern"] for r in pruned))
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled = set()
    for m, method in enumerate(methods):
        for g, pattern in enumerate(patterns):
            match = [r for r in pruned if r["method"] == method and r["pattern"] == pattern]
            if not match:
                continue
            x = g + (m - (len(methods) - 1) / 2) * width
            value = match[0]["perplexity"]
            ax.bar(x, value, width * 0.9, color=METHOD_COLORS.get(method, f"C{m}"),
                   label=None if method in labelled else method)
            labelled.add(method)
            ax.annotate(f"{value:.1f}", (x, value), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
    if dense:
        ax.axhline(dense[0], color="gray", linestyle="--", linewidth=1, label=f"dense ({dense[0]:.1f})")
    ax.set_xticks(range(len(patterns)), [PATTERN_LABELS.get(p, p) for p in patterns])
    ax.set_yscale("log")
    values = [r["perplexity"] for r in rows]
    ax.set_ylim(min(values) / 1.5, max(values) * 2.5)  # room above the tallest bar for its label
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(f"{title}: perplexity after pruning", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
