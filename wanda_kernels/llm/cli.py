"""The ``wanda-kernels`` command: prune, eval, demo.

    wanda-kernels demo                       # the main job on the built-in model and corpus (demo.py)
    wanda-kernels prune --model smollm2-135m --sparsity 0.5 --output pruned/
    wanda-kernels eval --model pruned/

Argument errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("wanda_kernels")


class UsageError(Exception):
    pass


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available")
    return dev


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _check_prune_args(args) -> None:
    """The options prune_model would refuse, refused before the model is loaded (exit status 2)."""
    from ..prune import prune_spec

    try:
        prune_spec(args.sparsity, args.pattern)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    for name in ("nsamples", "seqlen"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive; got {getattr(args, name)}")
    if getattr(args, "compressed", False) and args.pattern != "2:4":
        raise UsageError("--compressed needs --pattern 2:4")


def _windows(args, tokenizer, split):
    from . import data

    text = data.load_corpus(args.text, split=split)
    if split == "calib":
        return data.sample_windows(tokenizer, text, args.nsamples, args.seqlen, seed=args.seed)
    return data.eval_windows(tokenizer, text, args.seqlen, max_tokens=args.eval_tokens)


def cmd_prune(args) -> int:
    from . import checkpoint, evaluate, models, pipeline

    _check_prune_args(args)
    device = _device(args.device)
    model, tok = models.load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
    calib = _windows(args, tok, "calib")
    log.info("calibration: %d x %d tokens", *calib.shape)
    report = pipeline.prune_model(model, calib, args.sparsity, pattern=args.pattern, method=args.method,
                                  device=device)
    out = checkpoint.save_pruned(model, tok, args.output, report=report)
    print(f"pruned {len(report.layers)} decoder layers ({args.method}, {args.pattern}) in "
          f"{report.total_seconds:.1f} s, mean sparsity {report.overall_sparsity():.4f}; saved to {out}")
    if args.compressed:
        cdir = checkpoint.save_compressed(model, tok, Path(args.output) / "compressed", report=report,
                                          dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float16)
        print(f"2:4 compressed checkpoint: {cdir}")
    if args.eval:
        ppl = evaluate.perplexity(model, _windows(args, tok, "eval"))
        print(f"perplexity: {ppl:.3f}")
    return 0


def cmd_eval(args) -> int:
    from . import checkpoint, evaluate, models

    device = _device(args.device)
    if args.model is not None and checkpoint.is_compressed_checkpoint(args.model):
        model, tok = checkpoint.load_compressed(args.model, device=device)
    else:
        model, tok = models.load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
    windows = _windows(args, tok, "eval")
    t0 = time.perf_counter()
    ppl = evaluate.perplexity(model, windows)
    print(f"perplexity {ppl:.3f} over {windows.numel()} tokens ({windows.shape[0]} windows of {windows.shape[1]}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from . import demo, models

    _check_prune_args(argparse.Namespace(pattern="unstructured", sparsity=0.5, nsamples=args.nsamples,
                                         seqlen=args.seqlen))
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    model, tok = models.load_model(args.model, dtype=dtype, device=device)
    calib = _windows(args, tok, "calib")
    windows = _windows(args, tok, "eval")
    n_params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
    text = "Emma" if args.text is None else Path(args.text).name
    print(f"demo: {type(model).__name__} ({n_params} parameters), "
          f"{dtype}, {device}; calibration {calib.shape[0]} x {calib.shape[1]} tokens from the other Austen novels"
          f"{'' if args.text is None else f' ({args.text})'}; evaluation {windows.numel()} tokens of "
          f"{'Emma' if args.text is None else 'the text'} in windows of {windows.shape[1]}")

    def show(row):
        seconds = row["prune_seconds"]
        print(f"  {row['run']:<15} perplexity {row['perplexity']:9.2f}" +
              (f"   pruned in {seconds:.1f} s" if seconds else ""))

    rows = demo.run_demo(model, calib, windows, device=device, on_result=show)
    print("\n" + demo.format_table(rows))
    info = {"device": str(device), "dtype": str(dtype), "nsamples": args.nsamples, "seqlen": args.seqlen,
            "eval_tokens": int(windows.numel())}
    title = f"{type(model).__name__} ({n_params}) on {text}: dense vs 50% pruned"
    json_path, png = demo.write_results(rows, args.output_dir, info, title)
    print(f"\nwrote {json_path}" + (f" and {png}" if png else " (no chart: pip install matplotlib)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanda-kernels", description="Prune LLMs with Wanda and evaluate them.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, *, nsamples, seqlen, eval_tokens):
        sp.add_argument("--model", default=None, help="local Hugging Face model folder, or 'smollm2-135m' "
                        "(the built-in default: SmolLM2-135M-Instruct)")
        sp.add_argument("--text", default=None, help="a UTF-8 text file for calibration (first 90%%) and "
                        "evaluation (last 10%%); default: the built-in Jane Austen corpus (eval on Emma)")
        sp.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
        sp.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})")
        sp.add_argument("--eval-tokens", type=int, default=eval_tokens,
                        help=f"evaluate on at most this many tokens (default {eval_tokens})")
        sp.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
        sp.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'...")
        sp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="model dtype (auto: fp16 on CUDA, fp32 on CPU)")

    sp = sub.add_parser("prune", help="prune a model and save it", description="Prune every linear layer inside "
                        "the decoder layers, layer by layer on calibration text, and save the result.")
    common(sp, nsamples=128, seqlen=512, eval_tokens=65536)
    sp.add_argument("--sparsity", type=float, default=None, help="fraction pruned per output row, in [0, 1) "
                    "(default 0.5; with N:M it is 1 - N/M)")
    sp.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M', e.g. 2:4 or 4:8")
    sp.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"],
                    help="pruning metric: wanda (|W|*||X||), magnitude (|W|, per layer), sparsegpt (OBS update)")
    sp.add_argument("--output", required=True, help="folder for the pruned model (safetensors)")
    sp.add_argument("--compressed", action="store_true", help="with --pattern 2:4, also write the 2:4 "
                    "compressed checkpoint (SparseLinear) to OUTPUT/compressed")
    sp.add_argument("--eval", action="store_true", help="report the perplexity after pruning")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("eval", help="perplexity of a model", description="Perplexity over non-overlapping "
                        "windows of the evaluation text (Emma by default).")
    common(sp, nsamples=1, seqlen=512, eval_tokens=65536)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("demo", help="dense vs magnitude vs Wanda on the built-in model",
                        description="The main job: SmolLM2-135M on the Austen corpus, dense vs magnitude vs Wanda "
                        "at 50%% unstructured and 2:4; a table of perplexity and pruning time, and a bar chart. "
                        "The defaults finish in about 3.5 minutes on 2 CPU cores.")
    common(sp, nsamples=32, seqlen=256, eval_tokens=8192)
    sp.add_argument("--output-dir", default="demo_output", help="where demo.json and demo.png go")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        if args.verbose:
            raise
        print(f"wanda-kernels {args.command}: error: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
