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

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch

from diffpress.errors import DiffpressError

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


# -- where conditions come from (a recipe's calibration / evaluation ``conditions``) -----------------------
SOURCES = ("auto", "null", "random", "file")


@dataclass
class ConditionSource:
    """Where the conditions of calibration or evaluation samples come from.

    ``kind``: ``auto`` (class labels ``0, 1, ...`` for class-conditional models, random states for text
    models), ``null`` (the model's null condition: unconditional samples), ``random`` (standard-normal hidden
    states of the right shapes: not real text encodings, labelled as such in reports) or ``file`` (``path``:
    a safetensors file holding one tensor per conditioning input, named as the model names them, e.g.
    ``encoder_hidden_states``, ``pooled_projections``, ``text_embeds``; rows are reused in turn when fewer
    than the samples; inputs with a fixed default such as SDXL's ``time_ids`` may be left out).

    >>> ConditionSource("file")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: conditions.path: kind 'file' needs the path of a safetensors file of embeddings
    """

    kind: str = "auto"
    path: str | None = None

    def __post_init__(self) -> None:
        from diffpress.errors import check_allowed

        check_allowed("conditions.kind", self.kind, SOURCES)
        if self.kind == "file" and not self.path:
            raise DiffpressError("conditions.path: kind 'file' needs the path of a safetensors file of embeddings")
        if self.kind != "file" and self.path:
            raise DiffpressError(f"conditions.path: only kind 'file' reads a file (kind is {self.kind!r})")

    def describe(self) -> str:
        return {"auto": "automatic", "null": "the model's null condition", "file": f"embeddings from {self.path}",
                "random": "random normal hidden states (not text encodings)"}[self.kind]


def materialize(denoiser, source: ConditionSource | None, n: int, seed: int = 0) -> tuple[dict, str | None]:
    """Keyword arguments for :func:`diffpress.sample` / :func:`diffpress.calibrate` (``labels`` or ``cond``,
    or ``num_samples`` for an unconditional model) for ``n`` samples from ``source``, and a note saying
    what the conditions are when they are not real (random states) or None.

    >>> import diffpress
    >>> kw, note = materialize(diffpress.load("digits-dit"), ConditionSource(), 4)
    >>> kw["labels"].tolist(), note
    ([0, 1, 2, 3], None)
    """
    source = source or ConditionSource()
    if denoiser.cond_kind == "none":
        if source.kind not in ("auto", "null"):
            raise DiffpressError(f"conditions: this model is unconditional; kind {source.kind!r} does not apply "
                                 "(use auto)")
        return {"num_samples": n}, None
    if source.kind == "null":
        return {"cond": denoiser.null_cond(n)}, "unconditional samples (the model's null condition)"
    if source.kind == "file":
        return {"cond": load_file(denoiser, source.path, n)}, None
    if source.kind == "auto" and denoiser.num_classes is not None:
        return {"labels": torch.arange(n) % denoiser.num_classes}, None
    return ({"cond": denoiser.example_cond(n, seed)},
            "conditioned on random normal hidden states, not text encodings: compression fidelity is meaningful, "
            "the images are not any prompt's")


def load_file(denoiser, path: str | Path, n: int) -> Cond:
    """``n`` conditions from a safetensors file of per-input tensors (see :class:`ConditionSource`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as read

    path = Path(path)
    if not path.is_file():
        raise DiffpressError(f"conditions: no file at {path}; give a safetensors file with tensors "
                             f"{', '.join(denoiser.cond_names)}")
    try:
        state = read(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DiffpressError(f"conditions: {path} is not a readable safetensors file ({exc})") from exc
    parts = denoiser.parts
    unknown = sorted(set(state) - set(parts))
    if unknown:
        raise DiffpressError(f"conditions: {path} holds {unknown[0]!r}, which this model does not take; its inputs: "
                             f"{', '.join(parts)}")
    rows = {int(v.shape[0]) if v.dim() else 0 for v in state.values()}
    if len(rows) > 1 or 0 in rows:
        raise DiffpressError(f"conditions: the tensors in {path} must share a first (batch) dimension; got "
                             f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    have = rows.pop() if rows else 0
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, part in parts.items():
        if name not in state:
            if part.fill is None:
                raise DiffpressError(f"conditions: {path} has no {name!r}; this model needs "
                                     f"{', '.join(k for k, p in parts.items() if p.fill is None)}")
            out[name] = part.example(max(have, 1), g)
            continue
        v = state[name]
        if tuple(v.shape[1:]) != part.shape:
            raise DiffpressError(f"conditions: {name} in {path} has per-sample shape {tuple(v.shape[1:])}; this model "
                                 f"takes {part.shape}")
        out[name] = v.to(part.dtype)
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise DiffpressError(f"conditions: {name} in {path} holds NaN or inf values; fix the embeddings")
    reps = -(-n // have)
    out = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:n] for k, v in out.items()}
    return out if len(out) > 1 else next(iter(out.values()))
