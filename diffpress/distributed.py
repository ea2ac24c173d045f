"""Several processes, one result: calibration spread over ``torchrun`` workers.

Under ``torchrun --nproc_per_node N`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``),
:func:`init` joins the process group (gloo on CPU, nccl when CUDA is there). Work is split in fixed-size pieces
(calibration trajectories in chunks of ``batch_size`` seeds, observer batches of one timestep) that every
process computes exactly as a single process would; piece ``i`` goes to rank ``i % N``; results are gathered and
combined in piece order, so the calibration set, the statistics and the compressed model are bit-identical to a
single-process run; sums of tensors (pruning's gradients) go through :func:`reduce_in_order`, which adds the
pieces in piece order on every rank. Work whose result follows the clock (a time budget) runs on every rank and
:func:`share_state` / :func:`broadcast` give every rank rank 0's result. Rank 0 writes files. One process stays
the default: without a launcher nothing changes.

>>> init(), world()  # no launcher: one process
(False, (0, 1))
>>> mine(5)  # the pieces this rank computes
[0, 1, 2, 3, 4]
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable
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


def broadcast(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` (any picklable object) on every rank; ``value`` itself for a single process.

    >>> broadcast({"schedule": [1, 0, 1]})  # one process: the value itself
    {'schedule': [1, 0, 1]}
    """
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def _device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _broadcast_tensor(tensor: torch.Tensor, src: int) -> None:
    """In place, whatever device the tensor is on (nccl moves it through the process's GPU)."""
    dev = _device()
    if dev is None or tensor.device == dev:
        dist.broadcast(tensor, src=src)
    else:
        moved = tensor.to(dev)
        dist.broadcast(moved, src=src)
        tensor.copy_(moved.to(tensor.device))


def share_state(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers (same structure everywhere), in place.

    For work that cannot be identical on every rank: whatever depends on the clock (a time budget, a learning
    rate or temperature that follows elapsed time) runs everywhere, and rank 0's result is the one kept.

    >>> layer = torch.nn.Linear(2, 2)
    >>> before = layer.weight.clone()
    >>> share_state(layer)  # one process: nothing to share
    >>> torch.equal(layer.weight, before)
    True
    """
    if not active():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            _broadcast_tensor(tensor.data, src)


def reduce_in_order(pieces: int, compute: Callable[[int], torch.Tensor],
                    consume: Callable[[int, torch.Tensor], bool], numel: int,
                    dtype: torch.dtype = torch.float32) -> None:
    """Exact reductions over pieces of work, independent of the number of processes.

    Piece ``i`` is computed on rank ``i % N`` as ``compute(i)``, a flat tensor of ``numel`` elements; every rank is
    then handed every piece's result in piece order, ``consume(i, tensor)``, so a sum taken in ``consume`` adds the
    same numbers in the same order as one process would. ``consume`` returns False to stop (every rank stops at the
    same piece; pieces of the round in flight are dropped). Memory: two flat tensors.

    >>> total = torch.zeros(3)
    >>> reduce_in_order(4, lambda i: torch.full((3,), float(i)), lambda i, x: total.add_(x) is not None, numel=3)
    >>> total.tolist()
    [6.0, 6.0, 6.0]
    """
    rank, size = world()
    for start in range(0, pieces, size):
        own = start + rank
        result = compute(own) if own < pieces else None
        for j in range(min(size, pieces - start)):
            tensor = result if j == rank else torch.empty(numel, dtype=dtype)
            if size > 1:
                _broadcast_tensor(tensor, j)  # the owner sends its piece, the others receive it
            if not consume(start + j, tensor):
                return


def barrier() -> None:
    """Wait until every rank is here (a no-op for a single process)."""
    if active():
        dist.barrier()
