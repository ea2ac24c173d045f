"""Several processes, one result: calibration spread over ``torchrun`` workers.

Under ``torchrun --nproc_per_node N`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``),
:func:`init` joins the process group (gloo on CPU, nccl when CUDA is there). Work is split in fixed-size pieces
(calibration trajectories in chunks of ``batch_size`` seeds, observer batches of one timestep) that every
process computes exactly as a single process would; piece ``i`` goes to rank ``i % N``; results are gathered and
combined in piece order, so the calibration set, the statistics and the compressed model are bit-identical to a
single-process run. Rank 0 writes files. One process stays the default: without a launcher nothing changes.

>>> init(), world()  # no launcher: one process
(False, (0, 1))
>>> mine(5)  # the pieces this rank computes
[0, 1, 2, 3, 4]
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints reports."""
    return world()[0] == 0


def init(timeout_s: float = 3600.0) -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment); a no-op otherwise or
    when already joined. Returns whether this process now runs with others."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per process (the launcher's LOCAL_RANK); object collectives go through it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def finish() -> None:
    """Leave the process group (after the last collective), if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mine(pieces: int) -> list[int]:
    """Indices of the pieces (out of ``pieces``) this rank computes: ``i % world_size == rank``."""
    rank, size = world()
    return [i for i in range(pieces) if i % size == rank]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` for a single process)."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def gather_pieces(done: dict[int, Any]) -> dict[int, Any]:
    """Merge each rank's ``{piece index: result}`` into one dict in piece order, on every rank."""
    merged: dict[int, Any] = {}
    for part in gather(done):
        merged.update(part)
    return dict(sorted(merged.items()))


def barrier() -> None:
    """Wait until every rank is here (a no-op for a single process)."""
    if active():
        dist.barrier()
