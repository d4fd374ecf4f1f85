"""Calibration across processes: which samples this rank runs, and the collectives that
make every rank's result equal to a one-process run.

``prune_model`` asks :func:`current_shard` for this process's :class:`Shard`. Without an
initialised ``torch.distributed`` process group of two or more ranks (the usual case) the
shard is every sample and every method below is a no-op. Under ``torchrun`` (or any
launcher that initialised a group: NCCL on GPUs, gloo on CPU) rank ``r`` of ``W`` runs the
samples ``[r * n // W, (r + 1) * n // W)``, and the statistics are combined so that the
result does not depend on ``W``:

* Wanda's squared norms: every rank keeps one fp32 row per sample; the rows are gathered
  in rank order (= sample order) and every rank sums the same ``(n, in)`` tensor with the
  same operation (:meth:`Shard.sum_rows`), so the norms are bit-identical for any ``W``.
* SparseGPT's Hessians: a gathered row per sample would be ``(in, in)`` each, so every
  sample's fp32 ``X^T X`` is added into an fp64 sum and the ranks' sums are all-reduced
  (:meth:`Shard.sum_fp64`). An fp64 sum of fp32 terms is exact, hence independent of the
  order, unless one entry's terms span more than about ``2**(29 - log2 n)`` in magnitude;
  only then can ``W`` change its last fp64 bit, which reaches the fp32 Hessian with a
  chance of about ``2**-29`` per such entry.

The linear layers of a decoder layer are dealt to the ranks by size
(:meth:`Shard.owners`): each rank prunes its own (masks, SparseGPT's solve) and
broadcasts them (:meth:`Shard.broadcast_`), so the ranks end with the same weights,
and the pruning work is split too. A linear's result does not depend on which rank
computes it where every rank runs the same kernels (the same GPU model; on CPUs, the
same thread count). Every step that can raise is run inside
:func:`step`: a rank whose step raised tells the others, which raise
:class:`RankFailed` naming it, instead of waiting in the next collective until the
group's timeout. A rank that dies outright is seen by the others as a collective error,
or at the group's timeout.

Only ``torch.distributed`` collectives are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..norms import sum_call_rows

logger = logging.getLogger("wanda_kernels")

__all__ = ["Shard", "RankFailed", "current_shard", "shard_bounds", "step", "init_from_env", "env_rank",
           "leave_process_group",
           "is_main_process"]


class RankFailed(RuntimeError):
    """Another rank's step raised; this rank (``seen_by``) stops too. ``rank`` and ``message`` name it."""

    def __init__(self, rank: int, world_size: int, what: str, message: str, seen_by: int):
        self.rank, self.message, self.seen_by = rank, message, seen_by
        super().__init__(f"rank {rank} of {world_size} failed while {what}: {message}")


def shard_bounds(nsamples: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)``: rank ``rank``'s contiguous share of ``nsamples`` (sizes differ by at most one)."""
    return rank * nsamples // world_size, (rank + 1) * nsamples // world_size


@dataclass(frozen=True)
class Shard:
    """This process's share of the calibration samples and the collectives over all shares.

    Attributes:
        rank, world_size: this process and the group's size (0 and 1 without a group).
        start, stop: the samples ``calib[start:stop]`` this rank runs.
        nsamples: all samples, over every rank.
        group: the process group, or None when not distributed.
        comm_device: where tensors go for a collective (the CUDA device for NCCL, else CPU).
    """

    rank: int = 0
    world_size: int = 1
    start: int = 0
    stop: int = 0
    nsamples: int = 0
    group: object | None = None
    comm_device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that logs, shows progress and writes."""
        return self.rank == 0

    def samples_per_rank(self) -> list[int]:
        return [b - a for a, b in (shard_bounds(self.nsamples, self.world_size, r) for r in range(self.world_size))]

    # -- collectives (no-ops without a group) ----------------------------------------------------

    def sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The sum over every rank's rows, the same bits for any world size.

        Args:
            rows: ``(k, ...)`` fp32, this rank's per-sample terms in sample order
                (``k`` a multiple of this rank's sample count: one row per sample and call).

        Returns:
            ``(...)`` fp32 on ``rows.device``: the rows of all ranks in rank order, summed
            in fp64 by one ``sum(dim=0)`` (:func:`~wanda_kernels.norms.sum_call_rows`) over the
            gathered ``(K, ...)`` tensor, which is the same tensor on every rank and for every
            world size.
        """
        if self.distributed:
            rows = self._gather_rows(rows)
        return sum_call_rows(rows)

    def sum_fp64(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` (fp64, any shape) summed over the ranks, in place (all-reduce); returns it."""
        if self.distributed:
            buf = local if local.device == self.comm_device else local.to(self.comm_device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            if buf is not local:
                local.copy_(buf)
        return local

    def owners(self, costs: list[int]) -> list[int]:
        """The rank that computes each item of a list every rank holds: largest cost first, each to
        the least loaded rank (lowest rank on ties), so the same on every rank."""
        load = [0] * self.world_size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            owner[i] = min(range(self.world_size), key=lambda r: (load[r], r))
            load[owner[i]] += costs[i]
        return owner

    def broadcast_(self, tensors: list[torch.Tensor], owners: list[int]) -> None:
        """Overwrite ``tensors[i]`` on every rank with rank ``owners[i]``'s, in place; any devices."""
        if not self.distributed:
            return
        for t, src in zip(tensors, owners):
            buf = t if t.device == self.comm_device and t.is_contiguous() else t.to(self.comm_device).contiguous()
            dist.broadcast(buf, src=src, group=self.group)
            if buf is not t:
                t.copy_(buf)

    def check_same(self, what: str, fingerprint: list[int], fix: str = "every rank must pass the same one") -> None:
        """Raise ValueError on every rank unless all ranks passed the same integers (``fix``: what to do)."""
        if not self.distributed:
            return
        mine = torch.tensor(fingerprint, dtype=torch.int64, device=self.comm_device)
        seen = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(seen, mine, group=self.group)
        differ = [r for r, t in enumerate(seen) if not torch.equal(t, seen[0])]
        if differ:
            raise ValueError(f"{what} differs between ranks (rank 0 vs rank{'s' if len(differ) > 1 else ''} "
                             f"{', '.join(map(str, differ))}); {fix}")

    def step(self, what: str):
        """:func:`step` over this shard's group."""
        return step(what, self.group, self.comm_device)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        # all_gather needs equal shapes: pad every rank's rows to the largest count.
        k = self.stop - self.start
        per_call = rows.shape[0] // k
        counts = [n * per_call for n in self.samples_per_rank()]
        buf = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=self.comm_device)
        buf[: rows.shape[0]] = rows.to(self.comm_device)
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(rows.device)


@contextlib.contextmanager
def step(what: str, group=None, comm_device: torch.device | None = None):
    """Run a step that may raise on some ranks only; then every rank knows.

    On the rank that raised, its own exception propagates; every other rank raises
    :class:`RankFailed` naming the lowest failing rank and its message. Costs one small
    all-reduce when nothing failed; a no-op without a process group of two or more ranks.

    Args:
        what: the step, for the message ("calibrating decoder layer 3").
        group: the process group (default: the default group, if initialised).
        comm_device: where the flag tensor goes (CUDA for NCCL; default: by the backend).
    """
    if group is None and not _default_group_active():
        yield
        return
    group = group if group is not None else dist.group.WORLD
    if comm_device is None:
        comm_device = _comm_device(str(dist.get_backend(group)), None)
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # KeyboardInterrupt and SystemExit are not caught: the launcher ends the job
        error = exc
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=comm_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    world = dist.get_world_size(group)
    messages: list = [None] * world
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = next(r for r, m in enumerate(messages) if m is not None)
    raise RankFailed(failed, world, what, messages[failed], seen_by=dist.get_rank(group))


def _default_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True without a process group, and on rank 0 of one: the process that writes and prints."""
    return not _default_group_active() or dist.get_rank() == 0


def _comm_device(backend: str, work_device: torch.device | None) -> torch.device:
    """Where a collective's tensors go: the current CUDA device for NCCL, else the CPU."""
    if "nccl" not in backend:
        return torch.device("cpu")
    if work_device is not None and work_device.type != "cuda":
        if "gloo" not in backend:
            raise ValueError(f"device={work_device}: the process group's backend is {backend}, which needs "
                             "CUDA tensors; pass device='cuda' (each rank its own GPU) or use gloo")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def env_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` as ``torchrun`` sets them in the environment; ``(0, 1)`` without them."""
    return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)


def init_from_env(device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; this rank's device.

    With ``WORLD_SIZE`` > 1 in the environment: NCCL for a CUDA ``device`` (each rank on
    ``cuda:LOCAL_RANK``), gloo otherwise, with collectives that give up after
    ``timeout_s`` seconds. Without it (one process) or with a group already initialised:
    ``device`` unchanged.

    Raises:
        ValueError: a CUDA device with an index (each rank takes its own), or fewer GPUs
            on this node than its ranks.
    """
    _, world = env_rank()
    if world < 2 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world}, but this torch build has no torch.distributed")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None:
            raise ValueError(f"--device {device}: under torchrun each rank runs on cuda:LOCAL_RANK; "
                             "give --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local}, but this node has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    logger.info("rank %d of %d, on %s", dist.get_rank(), dist.get_world_size(), device)
    return device


def leave_process_group() -> None:
    """Destroy the default process group, if one is initialised (the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_shard(nsamples: int, work_device: torch.device | None = None) -> Shard:
    """This process's :class:`Shard` of ``nsamples`` calibration samples.

    Distributed when ``torch.distributed`` has an initialised default group of two or more
    ranks; otherwise one shard holding every sample.

    Args:
        nsamples: the calibration samples over all ranks (the same on every rank).
        work_device: where the layers run (``prune_model``'s ``device``), used to check
            that an NCCL group has CUDA work.

    Raises:
        ValueError: fewer samples than ranks, or an NCCL-only group with CPU work.
    """
    if not _default_group_active():
        return Shard(start=0, stop=nsamples, nsamples=nsamples)
    rank, world = dist.get_rank(), dist.get_world_size()
    if nsamples < world:
        raise ValueError(f"nsamples={nsamples} is fewer than the {world} ranks of the process group; "
                         "give every rank at least one calibration sample")
    comm = _comm_device(str(dist.get_backend()), work_device)
    start, stop = shard_bounds(nsamples, world, rank)
    return Shard(rank=rank, world_size=world, start=start, stop=stop, nsamples=nsamples,
                 group=dist.group.WORLD, comm_device=comm)
