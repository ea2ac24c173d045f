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
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # rectified-flow models (SD3, Flux, Sana, AuraFlow)
}
FLOW = ("flow-euler",)


def auto_sampler(denoiser: "Denoiser") -> str | None:
    """What ``auto`` means for ``denoiser``: the checkpoint's own scheduler (``None``), unless it ships none or
    a DDPM training schedule (poor in 50 steps), then the family's default sampler (DDIM; flow-euler for
    rectified-flow families)."""
    own = (denoiser.scheduler_config or {}).get("_class_name")
    if own and own != "DDPMScheduler":
        return None
    return denoiser.adapter.sampler or "ddim"


def make_scheduler(denoiser: "Denoiser", name: str | None = "auto"):
    """A fresh diffusers scheduler for ``denoiser``: ``name`` is a key of ``SCHEDULERS``, ``auto`` (see
    :func:`auto_sampler`) or ``None`` for the scheduler the checkpoint shipped with. The model's own noise
    schedule and prediction type are kept.

    >>> from diffpress import load
    >>> type(make_scheduler(load("digits-unet"), "dpm++")).__name__
    'DPMSolverMultistepScheduler'
    """
    import diffusers

    if name == "auto":
        name = auto_sampler(denoiser)
    # no scheduler shipped: diffusers' defaults, but without clip_sample (DDIM/DDPM clip the predicted x0 to
    # [-1, 1], which is wrong for latents and ruins guided samples; see diffpress/zoo/models.py)
    flow = denoiser.prediction_type == "flow"
    config = dict(denoiser.scheduler_config or ({} if flow else {"clip_sample": False}))
    if name is None:
        cls_name = config.get("_class_name") or ("FlowMatchEulerDiscreteScheduler" if flow else "DDPMScheduler")
    elif name in SCHEDULERS:
        if (name in FLOW) != flow:
            allowed = FLOW if flow else [n for n in SCHEDULERS if n not in FLOW]
            raise DiffpressError(f"sampler {name!r} does not fit a {'flow-matching' if flow else 'Gaussian-diffusion'} "
                                 f"model; allowed: {', '.join(allowed)} (or auto)")
        cls_name = SCHEDULERS[name]
    else:
        raise DiffpressError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}, auto")
    if not flow:
        config["prediction_type"] = denoiser.prediction_type
    elif "FlowMatch" not in config.get("_class_name", "FlowMatch"):
        config = {}  # a flow model shipped with a non-flow scheduler config: start from the flow defaults
    return getattr(diffusers, cls_name).from_config(config)
