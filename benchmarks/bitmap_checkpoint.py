"""Unstructured Wanda stored compressed (the bitmap format): ``python benchmarks/bitmap_checkpoint.py``

The built-in SmolLM2-135M-Instruct, pruned with Wanda at each ``--patterns`` entry
(default 50% and 60% unstructured, and 4:8; calibrated on the Austen novels other than
Emma, as ``ppl_table.py``), is saved twice: dense (``save_pruned``) and in the bitmap
format (``save_compressed(format="bitmap")``). For each it reports

* bytes: the pruned linear layers dense in the stored dtype vs as values + bitmap (+ row
  offsets), the whole model's tensors, and the two files;
* perplexity on Emma of the pruned model in the stored dtype and of the compressed
  checkpoint loaded back into ``BitmapLinear`` modules (``load_compressed``), with the
  time of each evaluation. On a CPU ``BitmapLinear`` runs ``F.linear`` on the
  decompressed weight, so the two perplexities must be equal; on a GPU the Triton
  kernel runs and they may differ in the last digits (summation order).

Writes ``benchmarks/results/bitmap_checkpoint_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_protocol_args, environment, format_table, load_protocol, protocol_info, write_results

log = logging.getLogger("bitmap_checkpoint")

PATTERNS = {"50%": ("unstructured", 0.5), "60%": ("unstructured", 0.6), "70%": ("unstructured", 0.7),
            "4:8": ("4:8", None), "2:4": ("2:4", None)}


def _tensor_bytes(path: Path, only: tuple[str, ...] | None = None) -> int:
    """Bytes of the tensors in a safetensors file (those whose name starts with one of ``only``)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            if only is None or name.startswith(only):
                t = f.get_slice(name)
                numel = 1
                for dim in t.get_shape():
                    numel *= dim
                total += numel * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}[t.get_dtype()]
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", nargs="+", default=["50%", "60%", "4:8"], choices=list(PATTERNS))
    add_protocol_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from wanda_kernels import BitmapLinear
    from wanda_kernels.llm import checkpoint, evaluate, models, pipeline

    device, work_dtype, model, tok, calib, windows = load_protocol(args)
    stored = torch.float16
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for label in args.patterns:
        pattern, sparsity = PATTERNS[label]
        model.load_state_dict(original)
        report = pipeline.prune_model(model, calib, sparsity, pattern=pattern, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            dense_dir, comp_dir = Path(tmp) / "dense", Path(tmp) / "bitmap"
            checkpoint.save_pruned(model, tok, dense_dir, report=report)
            t0 = time.perf_counter()
            checkpoint.save_compressed(model, tok, comp_dir, format="bitmap", dtype=stored, progress=False)
            compress_s = time.perf_counter() - t0
            manifest = json.loads((comp_dir / checkpoint.MANIFEST).read_text())
            layers = tuple(f"{name}." for name in manifest["sparse_layers"])
            dense_file, comp_file = dense_dir / "model.safetensors", comp_dir / "model.safetensors"
            # The dense checkpoint is in the working dtype: count its layers at 2 bytes per weight.
            per_weight = torch.finfo(work_dtype).bits // 8
            row = dict(pattern=label, sparsity=report.overall_sparsity(), sparse_layers=len(layers),
                       sparse_layers_dense_bytes=_tensor_bytes(dense_file, layers) * 2 // per_weight,
                       sparse_layers_bitmap_bytes=_tensor_bytes(comp_file, layers),
                       model_dense_bytes=_tensor_bytes(dense_file) * 2 // per_weight,
                       model_bitmap_bytes=_tensor_bytes(comp_file), dense_file_bytes=dense_file.stat().st_size,
                       bitmap_file_bytes=comp_file.stat().st_size, compress_seconds=compress_s,
                       prune_seconds=report.total_seconds)
            row["sparse_layers_ratio"] = row["sparse_layers_bitmap_bytes"] / row["sparse_layers_dense_bytes"]
            row["model_ratio"] = row["model_bitmap_bytes"] / row["model_dense_bytes"]
            # The dense checkpoint loaded in the stored dtype, as `wanda-kernels eval --dtype fp16` does
            # (not model.half(), which would also round the rotary tables to fp16).
            dense16, _ = models.load_model(dense_dir, dtype=stored, device=device, tokenizer=tok)
            t0 = time.perf_counter()
            row["dense_perplexity"] = evaluate.perplexity(dense16, windows, progress=False)
            row["dense_eval_seconds"] = time.perf_counter() - t0
            del dense16
            t0 = time.perf_counter()
            loaded, _ = checkpoint.load_compressed(comp_dir, device=device)
            row["bitmap_load_seconds"] = time.perf_counter() - t0  # sha256 check included
            kernels = {m.kernel() for m in loaded.modules() if isinstance(m, BitmapLinear)}
            t0 = time.perf_counter()
            row["bitmap_perplexity"] = evaluate.perplexity(loaded, windows, progress=False)
            row["bitmap_eval_seconds"] = time.perf_counter() - t0
            row["bitmap_kernel"] = "; ".join(sorted(kernels))
            row["layers_with_row_offsets"] = sum(m.row_offsets is not None for m in loaded.modules()
                                                 if isinstance(m, BitmapLinear))
            del loaded
        rows.append(row)
        log.info("%s: sparse layers %.4f of dense bytes, model %.4f; perplexity dense %.3f, bitmap %.3f", label,
                 row["sparse_layers_ratio"], row["model_ratio"], row["dense_perplexity"], row["bitmap_perplexity"])

    print(format_table(rows, [
        ("pattern", "pattern", ""), ("sparse_layers_ratio", "layers bytes", ".4f"),
        ("model_ratio", "model bytes", ".4f"), ("layers_with_row_offsets", "layers w/ offsets", "d"),
        ("dense_file_bytes", "dense file", ",d"), ("bitmap_file_bytes", "bitmap file", ",d"),
        ("dense_perplexity", "ppl dense", ".3f"), ("bitmap_perplexity", "ppl bitmap", ".3f"),
        ("bitmap_load_seconds", "load bitmap s", ".1f"),
        ("dense_eval_seconds", "eval dense s", ".1f"), ("bitmap_eval_seconds", "eval bitmap s", ".1f")]))
    env = environment(device)
    env.update(work_dtype=str(work_dtype), stored_dtype=str(stored),
               **protocol_info(args, windows, "bitmap_checkpoint.py", argv))
    print(f"\nwrote {write_results('bitmap_checkpoint', env, rows, args.out_dir)}")
    mismatch = [r["pattern"] for r in rows if device.type == "cpu" and r["dense_perplexity"] != r["bitmap_perplexity"]]
    if mismatch:  # on a CPU both run F.linear on the same fp16 weights
        log.error("the compressed checkpoint's perplexity differs from the dense one's at %s", mismatch)
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
