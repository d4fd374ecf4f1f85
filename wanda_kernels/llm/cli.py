"""The ``wanda-kernels`` command: prune, eval, demo.

    wanda-kernels demo                       # the main job on the built-in model and corpus (demo.py)
    wanda-kernels prune --model smollm2-135m --sparsity 0.5 --output pruned/
    wanda-kernels eval --model pruned/
    torchrun --nproc-per-node 8 -m wanda_kernels prune ...   # calibration split over 8 processes

Every option, path and device is checked before anything is loaded; a bad one exits
with status 2 and one line on stderr, and creates or changes no file. A failure later
on exits with status 1 and one line (``-v`` shows the traceback); ``prune`` writes its
output folder whole or not at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from .owl import DEFAULT_LAMBDA, DEFAULT_M

log = logging.getLogger("wanda_kernels")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A bad command line: exit status 2."""


# -- checks, all before any work ----------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device; give auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: {dev.type} is not supported; give auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                             f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return dev


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[name]  # argparse's choices have checked the name
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                         "give fp16 or fp32")
    return dtype


def _usage(exc: Exception, option: str | None = None) -> UsageError:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UsageError(f"{option}: {message}" if option else message)


def _check_common(args, device: torch.device | None = None) -> tuple[torch.device, torch.dtype, Path, str | None]:
    """Device, dtype, the text file and the model folder, each checked once: the device (``device``
    when the caller has resolved it already), the dtype, the model's folder (its files against
    their checksums when ``prune`` wrote it; a model of a kind it loads) and the --text file's
    content (read once, here; None for the built-in corpus)."""
    from . import checkpoint, data, models

    device = device or _device(args.device)
    dtype = _dtype(args.dtype, device)
    for name in ("nsamples", "seqlen", "eval_tokens"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive; got {value}")
    text = None
    if args.text is not None:
        try:
            text = data.read_text_file(args.text)
        except (OSError, ValueError) as exc:
            raise _usage(exc, "--text") from None
    try:
        model_dir = models.resolve_model_path(args.model)
    except OSError as exc:
        raise _usage(exc, "--model") from None
    if checkpoint.has_manifest(model_dir):  # written by prune: a damaged or missing file named before any is read
        checkpoint.verify_checkpoint(model_dir)
    try:
        models.model_class(models.load_config(model_dir))  # a model it can load (a decoder), said before loading
    except (OSError, ValueError) as exc:
        raise _usage(exc, "--model") from None
    return device, dtype, model_dir, text


def _check_prune_options(args) -> None:
    """The options prune_model would refuse, refused before the model is loaded."""
    from ..sparsify import DEFAULT_MIN_SPARSITY
    from .pipeline import check_options

    try:
        spec, _ = check_options(args.method, args.sparsity, args.pattern, **_mask_options(args))
    except (TypeError, ValueError) as exc:
        raise _usage(exc) from None
    if args.compressed and spec.nm != (2, 4) and spec.sparsity < DEFAULT_MIN_SPARSITY:
        what = f"--sparsity {spec.sparsity:g}" if spec.nm is None else f"--pattern {args.pattern} ({spec.sparsity:g})"
        raise UsageError(f"--compressed stores layers with at least {DEFAULT_MIN_SPARSITY:g} sparsity in the bitmap "
                         f"format; {what} is below it")
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be positive; got {args.dist_timeout}")


def _mask_options(args) -> dict:
    """prune_model's mask options from the command line (--metric, --owl*, --permute, --dsnot)."""
    return dict(metric=args.metric, owl=args.owl, owl_lambda=args.owl_lambda, owl_m=args.owl_m, permute=args.permute,
                dsnot=args.dsnot)


def _checked_path(check, path, **kwargs) -> None:
    """Run one of :mod:`.safe_io`'s output checks; its OSError becomes a usage error."""
    try:
        check(path, **kwargs)
    except OSError as exc:
        raise _usage(exc) from None


def _windows(args, tokenizer, split, text):
    """Token windows of ``split`` from --text's content (``text``), or from the built-in corpus when None."""
    from . import data

    corpus = data.load_corpus(split=split) if text is None else data.split_text(text, split)
    if split == "calib":
        return data.sample_windows(tokenizer, corpus, args.nsamples, args.seqlen, seed=args.seed)
    return data.eval_windows(tokenizer, corpus, args.seqlen, max_tokens=args.eval_tokens)


# -- the commands -------------------------------------------------------------------------------


def _join_process_group(args) -> tuple[torch.device, bool]:
    """Under torchrun: join the process group (this rank's device) and quiet every rank but 0.

    Returns ``(device, is rank 0 or the only process)``.
    """
    from . import distributed

    try:
        device = distributed.init_from_env(_device(args.device), args.dist_timeout)
    except ValueError as exc:
        raise _usage(exc) from None
    main = distributed.is_main_process()
    if not main:  # one copy of every line, warning and bar: rank 0's
        logging.getLogger("wanda_kernels").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    return device, main


def cmd_prune(args) -> int:
    from . import distributed

    _check_prune_options(args)
    device, main = _join_process_group(args)
    try:
        return _prune(args, device, main)
    finally:
        distributed.leave_process_group()


def _prune(args, device: torch.device, main: bool) -> int:
    from .._validation import parse_pattern
    from . import checkpoint, distributed, evaluate, models, pipeline
    from .safe_io import check_output_dir, staged_dir

    # Under torchrun a step that fails on one rank (a file missing on one node, a GPU out of
    # memory) ends every rank with that rank's error, instead of leaving them waiting.
    with distributed.step("checking the command line and loading the model"):
        _, dtype, model_dir, text = _check_common(args, device)
        if main:  # only rank 0 writes
            _checked_path(check_output_dir, args.output, overwrite=args.overwrite, name="--output",
                          overwrite_hint="give --overwrite to replace it")
        tok = models.load_tokenizer(model_dir)
        calib = _windows(args, tok, "calib", text)
        eval_windows = _windows(args, tok, "eval", text) if args.eval and main else None
        model, tok = models.load_model(model_dir, dtype=dtype, device=device, tokenizer=tok)
    log.info("calibration: %d x %d tokens", *calib.shape)
    report = pipeline.prune_model(model, calib, args.sparsity, pattern=args.pattern, method=args.method,
                                  device=device, **_mask_options(args))
    if not main:
        return 0
    ranks = f" on {report.world_size} processes" if report.world_size > 1 else ""
    print(f"pruned {len(report.layers)} decoder layers ({args.method}, {args.pattern}) in "
          f"{report.total_seconds:.1f} s{ranks}, mean sparsity {report.overall_sparsity():.4f}")
    if report.expert_linears:
        print(f"{report.expert_linears} of the pruned layers are experts' projections in fused mixture-of-experts "
              "weights" +
              (" (stored dense in the compressed checkpoint: its sparse modules replace linear layers)"
               if args.compressed else ""))
    # Everything goes into a sibling folder, renamed to --output once complete.
    with staged_dir(args.output, overwrite=args.overwrite, name="--output") as stage:
        print(f"writing the pruned model to {args.output}", flush=True)
        processor = models.processor_files(model_dir)  # a vision-language model's: its images' preprocessing
        checkpoint.save_pruned(model, tok, stage, report=report, extra_files=processor)
        if args.compressed:
            fmt = "2:4" if parse_pattern(args.pattern) == (2, 4) else "bitmap"  # 2:4: the sparse tensor cores
            print(f"writing the {fmt} compressed checkpoint to {Path(args.output) / 'compressed'}", flush=True)
            checkpoint.save_compressed(model, tok, stage / "compressed", format=fmt, report=report,
                                       dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16,
                                       extra_files=processor)
    print(f"saved to {args.output}")
    if eval_windows is not None:
        print(f"perplexity: {evaluate.perplexity(model, eval_windows):.3f}")
    return 0


def cmd_eval(args) -> int:
    from . import checkpoint, evaluate, models

    device, dtype, model_dir, text = _check_common(args)
    compressed = checkpoint.is_compressed_checkpoint(model_dir)  # (verified by _check_common)
    if compressed:
        stored = checkpoint.stored_dtype(model_dir)
        if args.dtype != "auto" and DTYPES[args.dtype] != stored:
            raise UsageError(f"--dtype {args.dtype}: {model_dir} is a {checkpoint.compressed_format(model_dir)} "
                             f"compressed checkpoint stored in "
                             f"{str(stored).replace('torch.', '')}; leave --dtype auto")
    tok = models.load_tokenizer(model_dir)
    windows = _windows(args, tok, "eval", text)
    if compressed:
        model, _ = checkpoint.load_compressed(model_dir, device=device, verify=False)  # verified above
    else:
        model, _ = models.load_model(model_dir, dtype=dtype, device=device, tokenizer=tok)
    t0 = time.perf_counter()
    ppl = evaluate.perplexity(model, windows)
    print(f"perplexity {ppl:.3f} over {windows.numel()} tokens ({windows.shape[0]} windows of {windows.shape[1]}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args) -> int:
    from . import demo, models
    from .safe_io import check_writable_dir

    device, dtype, model_dir, text = _check_common(args)
    _checked_path(check_writable_dir, args.output_dir, name="--output-dir")
    tok = models.load_tokenizer(model_dir)
    calib = _windows(args, tok, "calib", text)
    windows = _windows(args, tok, "eval", text)
    model, tok = models.load_model(model_dir, dtype=dtype, device=device, tokenizer=tok)
    n_params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
    text_name = "Emma" if args.text is None else Path(args.text).name
    print(f"demo: {model_dir.name} ({type(model).__name__}, {n_params} parameters), "
          f"{dtype}, {device}; calibration {calib.shape[0]} x {calib.shape[1]} tokens from "
          f"{'the other Austen novels' if args.text is None else f'the first 90% of {text_name}'}; evaluation "
          f"{windows.numel()} tokens of {'Emma' if args.text is None else f'the last 10% of {text_name}'} in "
          f"windows of {windows.shape[1]}")

    def show(row):
        seconds = row["prune_seconds"]
        print(f"  {row['run']:<24} perplexity {row['perplexity']:9.2f}" +
              (f"   pruned in {seconds:.1f} s" if seconds else ""))

    rows = demo.run_demo(model, calib, windows, device=device, on_result=show)
    print("\n" + demo.format_table(rows))
    info = {"model": model_dir.name, "device": str(device), "dtype": str(dtype), "nsamples": args.nsamples,
            "seqlen": args.seqlen, "seed": args.seed, "eval_tokens": int(windows.numel())}
    json_path, png = demo.write_results(rows, args.output_dir, info, f"{model_dir.name} ({n_params}) on {text_name}")
    print(f"\nwrote {json_path}" + (f" and {png}" if png else " (no chart: pip install matplotlib)"))
    return 0


# -- the parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanda-kernels", description="Prune LLMs with Wanda and evaluate them.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details; show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def model_and_text(sp):
        sp.add_argument("--model", default=None, help="local Hugging Face model folder, or 'smollm2-135m' "
                        "(the built-in default: SmolLM2-135M-Instruct)")
        sp.add_argument("--text", default=None, help="a UTF-8 text file for calibration (first 90%%) and "
                        "evaluation (last 10%%); default: the built-in Jane Austen corpus (eval on Emma)")

    def calibration(sp, nsamples, seqlen):
        sp.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
        sp.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})")
        sp.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")

    def evaluation(sp, eval_tokens, what=""):
        sp.add_argument("--eval-tokens", type=int, default=eval_tokens,
                        help=f"evaluate on at most this many tokens{what} (default {eval_tokens})")

    def device_and_dtype(sp):
        sp.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'...")
        sp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="model dtype (auto: fp16 on CUDA, fp32 on CPU)")

    sp = sub.add_parser("prune", help="prune a model and save it", description="Prune every linear layer inside "
                        "the decoder layers, layer by layer on calibration text, and save the result. The output "
                        "folder is written whole or not at all.")
    model_and_text(sp)
    calibration(sp, 128, 512)
    evaluation(sp, 65536, " with --eval")
    device_and_dtype(sp)
    sp.add_argument("--sparsity", type=float, default=None, help="fraction pruned per output row, in [0, 1) "
                    "(default 0.5; with N:M it is 1 - N/M)")
    sp.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M', e.g. 2:4 or 4:8")
    sp.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"],
                    help="pruning metric: wanda (|W|*||X||), magnitude (|W|, per layer), sparsegpt (OBS update)")
    sp.add_argument("--metric", default=None, choices=["wanda", "ria"], help="--method wanda's score: wanda "
                    "(default) or ria (relative importance: |W| over its row's and its column's sums, x ||X||^0.5)")
    sp.add_argument("--owl", action="store_true", help="unstructured: a sparsity per decoder layer from its share of "
                    "outlier scores (OWL), the mean exactly --sparsity")
    sp.add_argument("--owl-lambda", type=float, default=DEFAULT_LAMBDA, help="OWL's spread: layers span "
                    f"sparsity +- 2 x lambda at most (default {DEFAULT_LAMBDA})")
    sp.add_argument("--owl-m", type=float, default=DEFAULT_M, help="OWL's outliers: scores above M x the layer's "
                    f"mean (default {DEFAULT_M:g})")
    sp.add_argument("--permute", action="store_true", help="N:M: permute input channels so that the groups keep "
                    "more (folded into the model for down_proj/o_proj; stored with the 2:4 checkpoint otherwise)")
    sp.add_argument("--dsnot", action="store_true", help="--method wanda: refine each mask with DSnoT swaps that "
                    "lower the layer's reconstruction error (same counts)")
    sp.add_argument("--output", required=True, help="folder for the pruned model (safetensors); it must not exist "
                    "or be empty, unless --overwrite")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder as a whole "
                    "(its old files are removed once the new model is complete)")
    sp.add_argument("--compressed", action="store_true", help="also write the compressed checkpoint to "
                    "OUTPUT/compressed: with --pattern 2:4 the 2:4 format (SparseLinear, sparse tensor cores), "
                    "otherwise the bitmap format (BitmapLinear: 0.5625 of the dense bytes at 50%%)")
    sp.add_argument("--eval", action="store_true", help="report the perplexity after pruning")
    sp.add_argument("--dist-timeout", type=float, default=1800, help="under torchrun: seconds a rank waits "
                    "for the others at a collective before giving up (default 1800)")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("eval", help="perplexity of a model", description="Perplexity over non-overlapping "
                        "windows of the evaluation text (Emma by default). A checkpoint written by prune is "
                        "checked against its recorded checksums first.")
    model_and_text(sp)
    sp.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    evaluation(sp, 65536)
    device_and_dtype(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("demo", help="dense vs magnitude vs Wanda (and the best 2:4 mask) on the built-in model",
                        description="The main job: SmolLM2-135M on the Austen corpus, dense vs magnitude vs Wanda "
                        "at 50%% unstructured and 2:4, and 2:4 with RIA scores, channel permutation and DSnoT; a "
                        "table of perplexity and pruning time, and a bar chart. The defaults finish in 3 to 4.5 "
                        "minutes on 2 CPU cores.")
    model_and_text(sp)
    calibration(sp, 32, 256)
    evaluation(sp, 8192)
    device_and_dtype(sp)
    sp.add_argument("--output-dir", default="demo_output", help="where demo.json and demo.png go "
                    "(default demo_output; both files are replaced)")
    sp.set_defaults(func=cmd_demo)
    return p


# Errors that mean "the command line (or a file it names) is wrong": exit status 2.
_USAGE_ERRORS = (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                 IsADirectoryError, PermissionError, ImportError)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"wanda-kernels: warning: {_one_line(message) if isinstance(message, Warning) else message}",
          file=file or sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    show = warnings.showwarning
    if not args.verbose:
        warnings.showwarning = _show_warning  # one line per warning, not a file and line of torch's
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"wanda-kernels {args.command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        from .distributed import RankFailed, env_rank

        if isinstance(exc, RankFailed) and exc.seen_by != 0:
            return 1  # rank 0 says it, and the failing rank says its own
        usage = isinstance(exc, _USAGE_ERRORS)
        rank, world = env_rank()
        where = f" (rank {rank})" if world > 1 else ""
        print(f"wanda-kernels {args.command}{where}: error: {_one_line(exc)}"
              + ("" if usage else " (run with -v for the traceback)"), file=sys.stderr)
        return 2 if usage else 1
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
