"""The samplers diffpress names, and a fresh diffusers scheduler for a denoiser (diffusers is imported on use,
so the names cost nothing to read: the CLI lists them in its help without importing torch)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from diffpress.errors import DiffpressError

if TYPE_CHECKING:
    from diffpress.denoiser import Denoiser

SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(denoiser: "Denoiser", name: str | None = "ddim"):
    """A fresh diffusers scheduler for ``denoiser``: ``name`` is a key of ``SCHEDULERS`` or ``None`` for
    the scheduler the checkpoint shipped with. The model's own noise schedule and prediction type are kept.

    >>> from diffpress import load
    >>> type(make_scheduler(load("digits-unet"), "dpm++")).__name__
    'DPMSolverMultistepScheduler'
    """
    import diffusers

    config = dict(denoiser.scheduler_config or {})
    if name is None:
        cls_name = config.get("_class_name", "DDPMScheduler")
    elif name in SCHEDULERS:
        cls_name = SCHEDULERS[name]
    else:
        raise DiffpressError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    config["prediction_type"] = denoiser.prediction_type
    return getattr(diffusers, cls_name).from_config(config)
