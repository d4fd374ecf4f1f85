"""One rank of a gloo process group on the CPU, started by tests/test_distributed.py.

Not a test module (no ``test_`` prefix): spawned processes import it by name. Each rank
joins the group through a file rendezvous, runs one job, and writes what it saw to
``out_dir/rank{r}.pt``: ``{"error": None or (type name, message), "seconds": ..., "results": ...}``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from test_pipeline import pruned_weights, tiny_model


def smollm2_layers(keep: int):
    from wanda_kernels.llm import models

    model, _ = models.load_model()
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    return model


def make_model(spec: str):
    if spec in ("tiny", "mixtral"):
        return tiny_model("llama" if spec == "tiny" else spec)
    return smollm2_layers(int(spec.split(":")[1]))


def prune_configs(model_spec: str, calib: torch.Tensor, configs, device=None) -> dict:
    """``{(method, pattern): (pruned weights, report dict)}`` for each configuration, each on a fresh model
    (on the CPU; the layers run on ``device``)."""
    from wanda_kernels.llm import pipeline

    results = {}
    for method, pattern in configs:
        model = make_model(model_spec)
        report = pipeline.prune_model(model, calib, pattern=pattern, method=method, progress=False, device=device)
        weights = {name: w.clone() for name, w in pruned_weights(model).items()}  # saved apart from the model
        results[(method, pattern)] = (weights, report.to_dict())
    return results


def _job(rank: int, job: dict):
    calib = torch.load(job["calib"])
    kind = job["kind"]
    if kind == "equal":
        device = torch.device("cuda", rank) if job.get("backend") == "nccl" else None
        return prune_configs(job["model"], calib, job["configs"], device)
    from wanda_kernels.llm import pipeline

    model = make_model(job["model"])
    if kind == "mismatch" and rank == job["bad_rank"]:
        calib = calib.flip(0)
    if kind in ("raise", "die") and rank == job["bad_rank"]:
        def hook(module, args):
            if kind == "die":
                os._exit(3)
            raise ValueError(f"injected failure on rank {rank}")
        model.model.layers[job["layer"]].register_forward_pre_hook(hook)
    pipeline.prune_model(model, calib, method="wanda", progress=False)
    return None


def run_rank(rank: int, world: int, init_file: str, out_dir: str, job: dict, timeout_s: float) -> None:
    torch.set_num_threads(1)
    backend = job.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    t0 = time.perf_counter()
    record = {"error": None, "results": None}
    try:
        record["results"] = _job(rank, job)
    except Exception as exc:  # recorded for the test to check, with the rank's view of it
        record["error"] = (type(exc).__name__, str(exc))
    record["seconds"] = time.perf_counter() - t0
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    if record["error"] is None:
        dist.destroy_process_group()
