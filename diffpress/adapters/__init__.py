"""Adapters: one small file per model family, saying how to call it, what its conditioning is and its facts.

The passes never look at the family: they see a :class:`~diffpress.Denoiser` (``x_t, t, cond ->
prediction``) whose adapter does the calling. Built in: UNet2DModel, UNet2DConditionModel (SD and SDXL),
DiT, PixArt, SD3, Flux, Sana, AuraFlow and HunyuanDiT; UVit2DModel and PriorTransformer are refused with the
reason. Register your own family's adapter with :func:`register`; a plain ``nn.Module`` whose forward is
``(x, t, cond)`` needs none.

>>> from diffpress.adapters import for_class, supported
>>> for_class("FluxTransformer2DModel").name
'flux'
>>> for_class("UVit2DModel")
Traceback (most recent call last):
...
diffpress.errors.DiffpressError: UVit2DModel (aMUSEd) is a masked-token generator: it predicts logits over a VQ codebook for token ids, not the noise / velocity of a Gaussian denoiser, so diffpress's calibration along a Gaussian sampling trajectory does not apply to it
"""
from __future__ import annotations

from torch import nn

from diffpress.adapters.auraflow import AuraFlow
from diffpress.adapters.base import Adapter, ModuleAdapter, Part
from diffpress.adapters.dit import DiT
from diffpress.adapters.flux import Flux
from diffpress.adapters.hunyuandit import HunyuanDiT
from diffpress.adapters.pixart import PixArt
from diffpress.adapters.refused import PriorTransformer, UVit2D
from diffpress.adapters.sana import Sana
from diffpress.adapters.sd3 import SD3
from diffpress.adapters.unet2d import UNet2D
from diffpress.adapters.unet2d_condition import UNet2DCondition
from diffpress.errors import DiffpressError

__all__ = ["Adapter", "Part", "for_class", "for_model", "register", "supported"]

_BY_CLASS: dict[str, Adapter] = {}
MODULE = ModuleAdapter()


def register(adapter: Adapter, replace: bool = False) -> Adapter:
    """Make ``adapter`` drive the model classes it names (``adapter.classes``).

    >>> import torch
    >>> class MyUNet(UNet2D):  # a family whose class is not diffusers' own
    ...     classes = ("MyUNetModel",)
    ...     def model_class(self, name):
    ...         from diffusers import UNet2DModel
    ...         return UNet2DModel
    >>> register(MyUNet()).name
    'unet2d'
    """
    if not adapter.classes:
        raise DiffpressError(f"{type(adapter).__name__}.classes is empty; name the model classes it drives")
    for name in adapter.classes:
        if name in _BY_CLASS and not replace and type(_BY_CLASS[name]) is not type(adapter):
            raise DiffpressError(f"{name} already has an adapter ({type(_BY_CLASS[name]).__name__}); "
                                 "pass replace=True to override it")
    for name in adapter.classes:
        _BY_CLASS[name] = adapter
    return adapter


def supported() -> list[str]:
    """The model class names diffpress can compress (refused families left out)."""
    return [n for n, a in _BY_CLASS.items() if a.refuse is None]


def supported_text() -> str:
    return ", ".join(supported()) + "; or any nn.Module with forward(x, t, cond)"


def for_class(class_name: str) -> Adapter:
    """The adapter for a model class name (``_class_name`` in a config.json); a clear error otherwise."""
    adapter = _BY_CLASS.get(class_name)
    if adapter is None:
        raise DiffpressError(f"{class_name} is not a model family diffpress knows; supported: {supported_text()}. "
                             "Register an adapter for it (diffpress.adapters.register)")
    if adapter.refuse:
        raise DiffpressError(adapter.refuse)
    return adapter


def for_model(model: nn.Module) -> Adapter:
    """The adapter for a model object: by its class (or a base class) name; a plain module gets the
    ``(x, t, cond)`` convention; a diffusers model of a family diffpress does not know is refused."""
    for cls in type(model).__mro__:
        if cls.__name__ in _BY_CLASS:
            adapter = for_class(cls.__name__)
            adapter.check(model)
            return adapter
    if getattr(model, "config", None) is not None and type(model).__module__.startswith("diffusers"):
        for_class(type(model).__name__)  # raises: a diffusers family without an adapter
    return MODULE


for _adapter in (UNet2D(), UNet2DCondition(), DiT(), PixArt(), SD3(), Flux(), Sana(), AuraFlow(), HunyuanDiT(),
                 UVit2D(), PriorTransformer()):
    register(_adapter)
