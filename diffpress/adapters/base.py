"""The adapter contract: how diffpress calls one model family and what its conditioning is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffpress.errors import DiffpressError


@dataclass(frozen=True)
class Part:
    """One conditioning input of a family: its per-sample ``shape`` and ``dtype``, what the unconditional
    branch of classifier-free guidance gets (``null``: ``zeros``, the empty-prompt convention without a
    text encoder; ``same``, sizes / ids / masks the pipeline passes unchanged to both branches; ``label``,
    the model's null class), and ``fill``, the value of a part that is not random (sizes, masks, style)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    null: str = "zeros"
    fill: tuple[float, ...] | float | None = None

    def example(self, batch: int, generator: torch.Generator, high: int | None = None) -> torch.Tensor:
        """A value for ``batch`` samples: ``fill`` when set, random labels below ``high`` for labels,
        else standard-normal states (random, not a real text encoding)."""
        if self.fill is not None:
            value = torch.as_tensor(self.fill, dtype=self.dtype)
            return value.expand(batch, *self.shape).clone()
        if self.null == "label":
            return torch.randint(0, high or 1, (batch, *self.shape), generator=generator)
        return torch.randn(batch, *self.shape, generator=generator).to(self.dtype)


class Adapter:
    """How diffpress drives one model family; one small subclass per family (``diffpress/adapters/*.py``).

    Class facts: ``name`` (the denoiser's ``kind``), ``classes`` (model class names it handles),
    ``component`` (the pipeline-folder key: ``unet`` or ``transformer``), ``prediction_type`` and
    ``sampler`` (used when the checkpoint ships no scheduler), ``timestep_dtype``, and ``refuse`` (a reason,
    for a family diffpress cannot compress). Methods read the model's config: :meth:`check`,
    :meth:`sample_shape`, :meth:`parts` (the conditioning inputs), :meth:`labels` (class count and
    null label) and :meth:`forward` (the call, with any packing of latents or ids).

    >>> from diffpress.adapters import for_class
    >>> a = for_class("SD3Transformer2DModel")
    >>> a.name, a.prediction_type, a.sampler
    ('sd3', 'flow', 'flow-euler')
    """

    name = "module"
    classes: tuple[str, ...] = ()
    component = "transformer"
    prediction_type = "epsilon"
    sampler: str | None = None  # None: DDIM
    timestep_dtype = torch.long
    refuse: str | None = None
    guidance: float | None = None  # the default guidance scale; None: 3 with a null condition, else 1

    def model_class(self, class_name: str) -> type:
        """The class that loads a checkpoint of this family (diffusers' by default)."""
        import diffusers

        return getattr(diffusers, class_name)

    def check(self, model: nn.Module) -> None:
        """Raise :class:`DiffpressError` for configurations of the family diffpress cannot drive."""

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of ``x_t`` from the config (``sample_size``, ``in_channels``), or None if unknown."""
        config = model.config
        side = getattr(config, "sample_size", None)
        if side is None:
            return None
        h, w = (side, side) if isinstance(side, int) else tuple(side)
        return (config.in_channels, h, w)

    def parts(self, model: nn.Module, sample_shape: tuple[int, int, int]) -> dict[str, Part]:
        """The conditioning inputs by name (the keyword the model takes); empty if unconditional."""
        return {}

    def labels(self, model: nn.Module) -> tuple[int | None, int | None]:
        """``(num_classes, null_label)`` of a class-conditional family."""
        return None, None

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """``(cond, uncond)`` for ``prompts`` through the diffusers pipeline ``pipe`` (text components loaded)."""
        raise DiffpressError(f"encoding prompts for {self.name} models is not built in; encode them with the "
                             "pipeline yourself and give the embeddings as a file (conditions kind 'file')")

    @staticmethod
    def tensor_out(out: Any) -> torch.Tensor:
        """The prediction from a diffusers output object, a tuple or a tensor."""
        if hasattr(out, "sample"):
            return out.sample
        if isinstance(out, (tuple, list)):
            return out[0]
        return out


class FlowAdapter(Adapter):
    """A rectified-flow family (SD3, Flux, Sana, AuraFlow): predicts velocity, samples with flow-matching Euler,
    takes float timesteps (``sigma * 1000`` from the scheduler)."""

    prediction_type = "flow"
    sampler = "flow-euler"
    timestep_dtype = torch.float32


class ModuleAdapter(Adapter):
    """A plain ``nn.Module`` whose forward is ``(x, t, cond)``; shapes come from the user."""

    name = "module"

    def sample_shape(self, model):
        return None

    def forward(self, model, x, t, cond):
        return self.tensor_out(model(x, t, cond))


class Refused(Adapter):
    """A family diffpress knows and refuses: ``refuse`` holds the reason, which
    :func:`diffpress.adapters.for_class` raises before any model is built."""
