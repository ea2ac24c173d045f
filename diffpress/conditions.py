"""Conditions: what a denoiser is conditioned on, as one tensor or a mapping of named tensors (batch first).

Most families take one tensor (class labels, or text-encoder hidden states); some take several (SDXL: hidden
states, pooled text embeddings and size ids; SD3 / Flux: hidden states and pooled projections). diffpress
passes a bare tensor for the one-part families and a ``dict`` for the others; these helpers treat both alike.

>>> import torch
>>> c = {"encoder_hidden_states": torch.zeros(2, 4, 8), "pooled_projections": torch.ones(2, 8)}
>>> batch_size(cat(c, c)), {k: tuple(v.shape) for k, v in take(c, slice(0, 1)).items()}
(4, {'encoder_hidden_states': (1, 4, 8), 'pooled_projections': (1, 8)})
"""
from __future__ import annotations

from typing import Callable, Union

import torch

Cond = Union[torch.Tensor, dict, None]


def apply(fn: Callable, *conds: Cond) -> Cond:
    """``fn`` over the tensors of one or more conditions of the same structure (``None`` stays ``None``)."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: fn(*(c[k] for c in conds)) for k in first}
    return fn(*conds)


def cat(*conds: Cond) -> Cond:
    """Concatenate conditions along the batch."""
    return apply(lambda *v: torch.cat(v), *conds)


def take(cond: Cond, index) -> Cond:
    """Rows ``index`` (a slice or an index tensor) of every part."""
    return apply(lambda v: v[index], cond)


def tensors(cond: Cond) -> list[torch.Tensor]:
    """The tensors of a condition, in order."""
    if cond is None:
        return []
    return list(cond.values()) if isinstance(cond, dict) else [cond]


def batch_size(cond: Cond) -> int | None:
    parts = tensors(cond)
    return int(parts[0].shape[0]) if parts else None


def flatten(cond: Cond, prefix: str = "cond") -> dict[str, torch.Tensor]:
    """Tensors keyed for a safetensors file: ``prefix`` for one tensor, ``prefix.NAME`` for each named part."""
    if cond is None:
        return {}
    if isinstance(cond, dict):
        return {f"{prefix}.{k}": v.contiguous() for k, v in cond.items()}
    return {prefix: cond.contiguous()}


def unflatten(state: dict[str, torch.Tensor], prefix: str = "cond") -> Cond:
    """The inverse of :func:`flatten`."""
    if prefix in state:
        return state[prefix]
    parts = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return parts or None


def shapes(cond: Cond) -> tuple | dict | None:
    """Per-sample shape(s): a tuple for one tensor, ``{name: tuple}`` for named parts."""
    if cond is None:
        return None
    return apply(lambda v: tuple(v.shape[1:]), cond)
