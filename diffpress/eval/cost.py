"""Cost figures: parameters, bytes on disk, MACs counted on the captured graph, latency medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from safetensors.torch import save as st_save
from torch import nn

from diffpress.graph import capture


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def bytes_on_disk(model: nn.Module) -> int:
    """Size of the model's state dict serialized as safetensors (what ``save`` writes), in bytes; low-bit
    integer buffers count packed, as a denoiser's ``save_pretrained`` stores them."""
    packed_state = getattr(model, "packed_state", None)
    state = packed_state()[0] if packed_state is not None else {
        k: v.detach().contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for k in list(state):  # safetensors refuses shared storage; count each storage once
        ptr = state[k].data_ptr()
        if ptr in seen and state[k].numel():
            del state[k]
        else:
            seen[ptr] = k
    return len(st_save(state))


def macs_per_call(denoiser: nn.Module, batch: int = 1) -> int:
    """MACs of one denoiser call at ``batch``, counted on the graph captured with torch.export."""
    return capture(denoiser, batch=batch).macs


@torch.no_grad()
def latency_side_by_side(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each zero-argument callable, run interleaved so machine noise hits all alike.

    >>> out = latency_side_by_side({"a": lambda: sum(range(100))}, repeats=3, warmup=1)
    >>> out["a"] > 0
    True
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
