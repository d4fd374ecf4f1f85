"""Does calibration scale with processes? ``python benchmarks/prune_distributed.py``

Prunes the same model with ``prune_model`` on 1 and 2 (``--ranks``) gloo processes of
this machine, one after the other in one run, each rank with ``--threads-per-rank`` CPU
threads (default 1: a rank stands for one device), and reports the calibration
throughput: calibration tokens per second of the whole ``prune_model`` call (every
decoder layer run twice on them: statistics, then the pruned layer's outputs), and its
ratio to the first world size. Loading the model is not timed.

Before any number is kept, every world size's pruned weights are checked to be
bit-identical to the first one's (a sha256 over every pruned weight).
Results go to a new ``benchmarks/results/prune_distributed_<device>_<date>.json``.
With CUDA and ``--device cuda``, each rank runs on its own GPU with NCCL (needs that many GPUs).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from _common import environment, format_table, write_results

log = logging.getLogger("prune_distributed")


def _pruned_digest(model) -> str:
    from wanda_kernels.llm import pipeline

    _, layers = pipeline.find_decoder_layers(model)
    digest = hashlib.sha256()
    for layer in layers:
        for _, w in sorted(pipeline.prunable_weights(layer).items()):
            digest.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rank(rank: int, world: int, work: str, args: dict) -> None:
    """One process: join the group, load the model, prune (timed), write what it measured."""
    from wanda_kernels.llm import models, pipeline

    torch.set_num_threads(args["threads"])
    cuda = args["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{work}/rendezvous-{world}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=600))
    model, _ = models.load_model(args["model"], dtype=torch.float32)
    if args["layers"]:
        _, layers = pipeline.find_decoder_layers(model)
        del layers[args["layers"]:]
    calib = torch.load(Path(work) / "calib.pt")
    if world > 1:
        dist.barrier()  # start the clocks together
    t0 = time.perf_counter()
    report = pipeline.prune_model(model, calib, method=args["method"], pattern=args["pattern"], progress=False,
                                  device=torch.device("cuda", rank) if cuda else None)
    seconds = time.perf_counter() - t0
    torch.save({"seconds": seconds, "report": report.to_dict(), "digest": _pruned_digest(model)},
               Path(work) / f"world{world}-rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def _run_world(world: int, work: str, args: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, work, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"ranks {failed} of {world} failed (exit codes {[p.exitcode for p in procs]})")
    return [torch.load(Path(work) / f"world{world}-rank{r}.pt") for r in range(world)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--layers", type=int, default=0, help="prune only the first N decoder layers (default: all)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes, in order (default 1 2)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="torch CPU threads of each rank (default 1)")
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu: gloo; cuda: NCCL, a GPU per rank")
    p.add_argument("--out-dir", default=None, help="where to write the JSON (default benchmarks/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ranks):
        print(f"prune_distributed: --device cuda needs {max(args.ranks)} GPUs; this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2

    from wanda_kernels.llm import data, models

    model_dir = models.resolve_model_path(args.model)
    tok = models.load_tokenizer(model_dir)
    calib = data.sample_windows(tok, data.load_corpus(split="calib"), args.nsamples, args.seqlen, seed=0)
    job = {"model": str(model_dir), "layers": args.layers, "threads": args.threads_per_rank, "method": args.method,
           "pattern": args.pattern, "device": args.device}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        torch.save(calib, Path(work) / "calib.pt")
        for world in args.ranks:
            log.info("%d rank%s ...", world, "s" if world > 1 else "")
            ranks = _run_world(world, work, job)
            digests = {r["digest"] for r in ranks}
            if len(digests) != 1:
                raise SystemExit(f"prune_distributed: the {world} ranks' pruned weights differ from each other")
            if rows and rows[0]["weights_sha256"] not in digests:
                raise SystemExit(f"prune_distributed: the pruned weights of {world} ranks differ from those of "
                                 f"{rows[0]['world_size']}")
            seconds = max(r["seconds"] for r in ranks)
            rep = [r["report"] for r in ranks]
            rows.append({
                "world_size": world, "threads_per_rank": args.threads_per_rank, "method": args.method,
                "pattern": args.pattern, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "layers": len(rep[0]["layers"]), "calib_tokens": args.nsamples * args.seqlen,
                "calib_tokens_per_rank": rep[0]["calib_tokens_per_rank"],
                "seconds": seconds, "tokens_per_s": args.nsamples * args.seqlen / seconds,
                "forward_s_max": max(x["forward_seconds"] for x in rep),
                "comm_s_max": max(x["comm_seconds"] for x in rep),
                "prune_s_max": max(x["prune_seconds"] for x in rep),
                "per_rank": [{k: x[k] for k in ("forward_seconds", "comm_seconds", "prune_seconds", "total_seconds")}
                             for x in rep],
                "weights_sha256": digests.pop(),
            })
    for row in rows:
        row["speedup_vs_first"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    env = environment(device)
    env.update(model=model_dir.name, cpu_cores=os.cpu_count(), backend="nccl" if args.device == "cuda"
               else "gloo", timing="wall clock of prune_model, the slowest rank; model loading not timed")
    print(format_table(rows, [("world_size", "ranks", "d"), ("threads_per_rank", "threads/rank", "d"),
                              ("seconds", "total s", ".1f"), ("tokens_per_s", "calib tok/s", ".1f"),
                              ("speedup_vs_first", "ratio", ".2f"), ("forward_s_max", "forward s", ".1f"),
                              ("comm_s_max", "comm s", ".2f"), ("prune_s_max", "prune s", ".2f")]))
    path = write_results("prune_distributed", env, rows, args.out_dir)
    print(f"pruned weights bit-identical across world sizes {args.ranks}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
