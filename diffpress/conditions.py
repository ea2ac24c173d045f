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
SOURCES = ("auto", "null", "random", "file", "prompts")


@dataclass
class ConditionSource:
    """Where the conditions of calibration or evaluation samples come from.

    ``kind``: ``auto`` (class labels ``0, 1, ...`` for class-conditional models, random states for text
    models), ``null`` (the model's null condition: unconditional samples), ``random`` (standard-normal hidden
    states of the right shapes: not real text encodings, labelled as such in reports) or ``file`` (``path``:
    a safetensors file holding one tensor per conditioning input, named as the model names them, e.g.
    ``encoder_hidden_states``, ``pooled_projections``, ``text_embeds``; rows are reused in turn when fewer
    than the samples; inputs with a fixed default such as SDXL's ``time_ids`` may be left out) or ``prompts``
    (``path``: a text file, one prompt per line, encoded by the text encoder(s) of the diffusers pipeline
    folder ``pipeline``, as that pipeline encodes them, its empty-prompt encoding as the guidance null;
    needs ``pip install diffpress[prompts]``, i.e. transformers).

    >>> ConditionSource("file")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: conditions.path: kind 'file' needs the path of a safetensors file of embeddings
    """

    kind: str = "auto"
    path: str | None = None
    pipeline: str | None = None  # kind prompts: the diffusers pipeline folder whose text encoders encode them

    def __post_init__(self) -> None:
        from diffpress.errors import check_allowed

        check_allowed("conditions.kind", self.kind, SOURCES)
        if self.kind == "file" and not self.path:
            raise DiffpressError("conditions.path: kind 'file' needs the path of a safetensors file of embeddings")
        if self.kind == "prompts" and not (self.path and self.pipeline):
            raise DiffpressError("conditions: kind 'prompts' needs path (a text file, one prompt per line) and "
                                 "pipeline (a diffusers pipeline folder with its text encoders)")
        if self.kind not in ("file", "prompts") and self.path:
            raise DiffpressError(f"conditions.path: only kinds 'file' and 'prompts' read a file (kind is {self.kind!r})")
        if self.kind != "prompts" and self.pipeline:
            raise DiffpressError(f"conditions.pipeline: only kind 'prompts' uses a pipeline (kind is {self.kind!r})")


def materialize(denoiser, source: ConditionSource | None, n: int, seed: int = 0) -> tuple[dict, str | None]:
    """Keyword arguments for :func:`diffpress.sample` / :func:`diffpress.calibrate` (``labels`` or ``cond``
    and, for prompts, ``uncond``; ``num_samples`` for an unconditional model) for ``n`` samples from
    ``source``, and a note saying what the conditions are when they are not real (random states) or None.

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
    if source.kind == "prompts":
        prompts = read_prompts(source.path)
        cond, uncond = encode_prompts(denoiser, source.pipeline, prompts)
        reps = -(-n // len(prompts))
        cond = take(cat(*[cond] * reps), slice(0, n))
        uncond = take(cat(*[uncond] * reps), slice(0, n)) if uncond is not None else None
        return {"cond": cond, **({"uncond": uncond} if uncond is not None else {})}, None
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
    out = complete(denoiser, state, str(path))
    reps = -(-n // rows.pop())
    return apply(lambda v: v.repeat(reps, *([1] * (v.dim() - 1)))[:n], out)


def complete(denoiser, values: dict[str, torch.Tensor], source: str) -> Cond:
    """``values`` (one tensor per conditioning input, by name) checked against the model's inputs, with the
    inputs that have a fixed default (sizes, masks) filled in where missing; one tensor for a one-input model."""
    parts = denoiser.parts
    have = int(next(iter(values.values())).shape[0])
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, part in parts.items():
        if name not in values:
            if part.fill is None:
                raise DiffpressError(f"conditions: {source} has no {name!r}; this model needs "
                                     f"{', '.join(k for k, p in parts.items() if p.fill is None)}")
            out[name] = part.example(have, g)
            continue
        v = values[name]
        if tuple(v.shape[1:]) != part.shape:
            raise DiffpressError(f"conditions: {name} in {source} has per-sample shape {tuple(v.shape[1:])}; this "
                                 f"model takes {part.shape}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise DiffpressError(f"conditions: {name} in {source} holds NaN or inf values; fix the embeddings")
        out[name] = v.to(part.dtype)
    return out if len(out) > 1 else next(iter(out.values()))


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per non-empty line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffpressError(f"conditions: cannot read prompts from {path} ({exc}); give a UTF-8 text file, one "
                             "prompt per line") from exc
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise DiffpressError(f"conditions: {path} holds no prompts; write one prompt per line")
    return prompts


def encode_prompts(denoiser, pipeline: str | Path, prompts: list[str]) -> tuple[Cond, Cond]:
    """``prompts`` encoded as the diffusers pipeline in folder ``pipeline`` encodes them (only its text
    encoders and tokenizers are loaded), and the null condition for guidance that the pipeline uses (the
    empty prompt's encoding, or zeros where the pipeline says so); the null is None for families sampled
    without classifier-free guidance. The family's adapter knows the pipeline's ``encode_prompt``."""
    import json

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DiffpressError("conditions: encoding prompts needs transformers: pip install 'diffpress[prompts]'") \
            from None
    import diffusers

    folder = Path(pipeline)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise DiffpressError(f"conditions.pipeline: {folder} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_path.read_text())
    text = {k for k, v in index.items() if k.startswith(("text_encoder", "tokenizer")) and v != [None, None]}
    if not text:
        raise DiffpressError(f"conditions.pipeline: {folder} has no text encoder or tokenizer")
    # every other component ([library, class] entries: unet, vae, scheduler ...) stays unloaded
    skip = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and k not in text}
    if denoiser.adapter.component in skip:  # some pipelines read its config while encoding (SD3: the T5 width)
        skip[denoiser.adapter.component] = denoiser.model
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **skip)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DiffpressError(f"conditions.pipeline: could not load the text encoders of {folder} "
                             f"({type(exc).__name__}: {exc})") from exc
    with torch.no_grad():
        encoded = denoiser.adapter.encode_prompts(pipe, prompts)
    names = denoiser.cond_names
    out = []
    for label, value in zip(("the prompts", "the null prompt"), encoded):
        if value is not None:
            value = value if isinstance(value, dict) else {names[0]: value}
            value = complete(denoiser, {k: v.float() for k, v in value.items()},
                             f"{label} encoded by {folder.name}")
        out.append(value)
    return out[0], out[1]
