"""The sampler loop over a diffusers scheduler, with classifier-free guidance, seeds and trajectory recording."""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import diffpress.conditions as conditions
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError
from diffpress.schedulers import SCHEDULERS, make_scheduler  # noqa: F401  (part of this module's API)

@dataclass
class Trajectory:
    """What the denoiser saw at every step of one sampling run.

    ``latents[i]`` is the model input ``x_t`` (after the scheduler's input scaling) at ``timesteps[i]``,
    shape ``(steps, B, C, H, W)``. With guidance the denoiser saw each ``x_t`` twice, with ``cond`` and with
    ``uncond``: :meth:`inputs` returns exactly that doubled batch.
    """

    timesteps: torch.Tensor
    latents: torch.Tensor
    cond: conditions.Cond = None
    uncond: conditions.Cond = None
    guidance: float = 1.0

    def __len__(self) -> int:
        return len(self.timesteps)

    def inputs(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The ``(x_t, t, cond)`` the denoiser was called with at ``step``."""
        x = self.latents[step]
        cond = self.cond
        if self.uncond is not None:
            x = torch.cat([x, x])
            cond = conditions.cat(self.cond, self.uncond)
        t = self.timesteps[step].expand(x.shape[0])
        return x, t, cond


@dataclass
class SampleOutput:
    """Final samples ``images`` (B, C, H, W), the requested ``labels`` if any, and the ``trajectory`` if recorded."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    trajectory: Trajectory | None = None
    calls: int = field(default=0)  # denoiser evaluations per sample (steps run, doubled by guidance)


@torch.no_grad()
def _run(denoiser: Denoiser, scheduler, x: torch.Tensor, gens: list[torch.Generator], cond, uncond,
         guidance: float, steps: int, record: bool, bar) -> tuple[torch.Tensor, Trajectory | None, int]:
    scheduler.set_timesteps(steps, **_shift(scheduler, x))
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start from unit noise
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    denoiser.runtime.reset(steps=len(scheduler.timesteps))  # a new trajectory: cache hooks start afresh
    try:
        x, rec_t, rec_x = _steps(denoiser, scheduler, x, cond, uncond, guidance, record, bar, step_kwargs)
    finally:
        denoiser.runtime.end()  # outside a sampler again: no step index
    traj = Trajectory(torch.stack(rec_t), torch.stack(rec_x), cond, uncond, guidance) if record else None
    return x, traj, len(scheduler.timesteps)


def _shift(scheduler, x: torch.Tensor) -> dict:
    """``mu`` for a flow-matching scheduler with resolution-dependent shifting (Flux, SD3.5 configs): the
    pipelines' linear map from the image token count (2x2 latent patches) to the shift, from its config."""
    c = scheduler.config
    if not getattr(c, "use_dynamic_shifting", False):
        return {}
    tokens = x.shape[-2] * x.shape[-1] // 4
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return {"mu": tokens * slope + base - slope * base_len}


def _steps(denoiser: Denoiser, scheduler, x, cond, uncond, guidance: float, record: bool, bar, step_kwargs):
    """The sampling loop: one denoiser call per step (both guidance branches in one batch)."""
    use_cfg = uncond is not None
    rec_t, rec_x = [], []
    for i, t in enumerate(scheduler.timesteps):
        denoiser.runtime.at_step(i)
        xin = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        if record:
            rec_t.append(t.clone())
            rec_x.append(xin.clone())
        if use_cfg:
            pred_c, pred_u = denoiser(torch.cat([xin, xin]), t, conditions.cat(cond, uncond)).chunk(2)
            pred = pred_u + guidance * (pred_c - pred_u)
        else:
            pred = denoiser(xin, t, cond)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        bar.update(1)
    return x, rec_t, rec_x


def sample(
    denoiser: Denoiser,
    *,
    num_samples: int | None = None,
    labels: torch.Tensor | list[int] | None = None,
    cond: conditions.Cond = None,
    uncond: conditions.Cond = None,
    guidance: float = 1.0,
    steps: int = 50,
    scheduler: str | None = "auto",
    seed: int = 0,
    batch_size: int = 256,
    record: bool = False,
    progress: bool = True,
) -> SampleOutput:
    """Generate samples; sample ``i`` uses seed ``seed + i``, so results do not depend on ``batch_size``.

    Conditioning: ``labels`` (class ids, encoded by the denoiser) or ``cond`` directly. With
    ``guidance != 1`` classifier-free guidance mixes in the unconditional branch (``uncond``, or the
    denoiser's null condition). ``record=True`` keeps the :class:`Trajectory` (one batch only).

    >>> from diffpress import load
    >>> den = load("digits-cond-unet")
    >>> out = sample(den, labels=[3, 7], guidance=3.0, steps=10, seed=0, progress=False)
    >>> out.images.shape
    torch.Size([2, 1, 16, 16])
    """
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if cond is not None:
            raise DiffpressError("pass either labels or cond, not both")
        cond = denoiser.encode_labels(labels)
    if cond is not None:
        n = conditions.batch_size(cond)
        if num_samples is not None and num_samples != n:
            raise DiffpressError(f"num_samples={num_samples} but {n} conditions were given")
    elif denoiser.cond_kind != "none":
        raise DiffpressError(f"this denoiser is conditional ({denoiser.cond_kind}); pass labels or cond")
    else:
        n = num_samples if num_samples is not None else 1
    if n < 1:
        raise DiffpressError(f"nothing to sample: asked for {n} samples; ask for at least one")
    use_cfg = guidance != 1.0 and cond is not None
    if use_cfg and uncond is None:
        uncond = denoiser.null_cond(n, like=cond)
    if not use_cfg:
        uncond = None
    if record and n > batch_size:
        raise DiffpressError(f"record=True keeps one batch; ask for at most batch_size={batch_size} samples")
    if steps < 1:
        raise DiffpressError(f"steps must be >= 1, got {steps}")

    chunks = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    images, traj = [], None
    with eval_mode(denoiser), tqdm(total=steps * len(chunks), desc="sampling", disable=not progress, leave=False) as bar:
        for lo, hi in chunks:
            gens = [torch.Generator().manual_seed(s) for s in range(seed + lo, seed + hi)]
            x = torch.stack([torch.randn(denoiser.sample_shape, generator=g) for g in gens])
            c = conditions.take(cond, slice(lo, hi))
            u = conditions.take(uncond, slice(lo, hi))
            sched = make_scheduler(denoiser, scheduler)
            if use_cfg and lo == 0 and getattr(sched.config, "clip_sample", False):
                warnings.warn(
                    f"{type(sched).__name__} has clip_sample=True: it clips the predicted x0 but not the "
                    "epsilon, which degrades guided samples badly (digits-cond-unet, guidance 3: conditional "
                    "accuracy 0.39 with clipping, 1.00 without); set clip_sample=False in the scheduler config",
                    stacklevel=2)
            out, traj, n_calls = _run(denoiser, sched, x, gens, c, u, guidance, steps, record, bar)
            images.append(out)
    return SampleOutput(torch.cat(images), labels, traj, n_calls * (2 if use_cfg else 1))
