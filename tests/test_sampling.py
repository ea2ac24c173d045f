"""diffpress.sample: seeds, schedulers, classifier-free guidance and trajectory recording."""
from __future__ import annotations

import pytest
import torch

from diffpress import Denoiser, DiffpressError, make_scheduler, sample

SCHEDULERS = ("ddim", "ddpm", "euler", "dpm++")
STEPS = 4


def initial_noise(shape, seed: int, n: int) -> torch.Tensor:
    """The x_T that sample() draws: sample i from its own generator seeded ``seed + i``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_seed_same_images_other_seed_other_images(plain, scheduler, sizes):
    run = lambda seed: sample(plain, num_samples=2, steps=STEPS, scheduler=scheduler, seed=seed,  # noqa: E731
                              progress=False)
    a, b, c = run(3), run(3), run(4)
    assert a.images.shape == (2, sizes.channels, 8, 8) and a.labels is None and a.trajectory is None
    assert torch.equal(a.images, b.images)
    assert (a.images - c.images).abs().max() > 1e-2
    assert (a.images[0] - a.images[1]).abs().max() > 1e-2  # the two samples of one batch differ too
    assert a.calls == STEPS


def test_ddpm_is_stochastic_but_seeded(plain):
    """DDPM draws fresh noise every step, from the per-sample generators (not the global RNG)."""
    ddpm = sample(plain, num_samples=1, steps=STEPS, scheduler="ddpm", seed=0, progress=False).images
    ddim = sample(plain, num_samples=1, steps=STEPS, scheduler="ddim", seed=0, progress=False).images
    assert (ddpm - ddim).abs().max() > 1e-2
    torch.manual_seed(123)  # the global RNG state must not matter
    again = sample(plain, num_samples=1, steps=STEPS, scheduler="ddpm", seed=0, progress=False).images
    assert torch.equal(ddpm, again)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_batch_size_invariance(plain, scheduler):
    """Sample i depends only on seed + i: splitting into batches, or asking for it alone, changes nothing."""
    whole = sample(plain, num_samples=3, steps=STEPS, scheduler=scheduler, seed=5, progress=False).images
    split = sample(plain, num_samples=3, steps=STEPS, scheduler=scheduler, seed=5, batch_size=2,
                   progress=False).images
    alone = sample(plain, num_samples=1, steps=STEPS, scheduler=scheduler, seed=7, progress=False).images
    scale = max(1.0, float(whole.abs().max()))
    assert split.shape == whole.shape == (3, 2, 8, 8)
    assert float((split - whole).abs().max()) <= 1e-4 * scale
    assert float((alone[0] - whole[2]).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_trajectory_shapes_timesteps_and_first_input(plain, scheduler, sizes):
    out = sample(plain, num_samples=2, steps=5, scheduler=scheduler, seed=11, record=True, progress=False)
    traj = out.trajectory
    ref = make_scheduler(plain, scheduler)
    ref.set_timesteps(5)
    assert type(ref).__name__ == {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                                  "dpm++": "DPMSolverMultistepScheduler"}[scheduler]
    assert len(traj) == 5 and out.calls == 5
    assert traj.latents.shape == (5, 2, sizes.channels, 8, 8)
    assert torch.equal(traj.timesteps, ref.timesteps)
    assert traj.cond is None and traj.uncond is None and traj.guidance == 1.0
    # the first model input is the seeded noise: scaled by init_noise_sigma, then by scale_model_input
    # (for Euler the two cancel; for the others both are the identity)
    torch.testing.assert_close(traj.latents[0], initial_noise((sizes.channels, 8, 8), 11, 2), rtol=1e-4, atol=1e-4)
    x, t, cond = traj.inputs(2)
    assert x.shape == (2, sizes.channels, 8, 8) and torch.equal(x, traj.latents[2]) and cond is None
    assert torch.equal(t, ref.timesteps[2].expand(2))


def test_one_ddim_step_by_hand(plain, sizes):
    """steps=1: x_0 is one scheduler step from the seeded noise with the model's prediction at t."""
    out = sample(plain, num_samples=2, steps=1, scheduler="ddim", seed=2, progress=False)
    sched = make_scheduler(plain, "ddim")
    sched.set_timesteps(1)
    (t,) = sched.timesteps
    x = initial_noise((sizes.channels, 8, 8), 2, 2)
    with torch.no_grad():
        expected = sched.step(plain(x, t), t, x).prev_sample
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-6)


# -- classifier-free guidance ----------------------------------------------------------------------
def test_guidance_doubles_the_batch_with_cond_then_uncond(dit, sizes):
    out = sample(dit, labels=[1, 3], guidance=4.0, steps=3, seed=0, record=True, progress=False)
    traj = out.trajectory
    assert out.calls == 6 and torch.equal(out.labels, torch.tensor([1, 3]))
    assert traj.guidance == 4.0
    assert torch.equal(traj.cond, torch.tensor([1, 3]))
    assert torch.equal(traj.uncond, torch.full((2,), sizes.num_classes))
    for step in range(3):
        x, t, cond = traj.inputs(step)
        assert x.shape == (4, sizes.channels, 8, 8)
        assert torch.equal(x[:2], traj.latents[step]) and torch.equal(x[2:], traj.latents[step])
        assert torch.equal(cond, torch.tensor([1, 3, sizes.num_classes, sizes.num_classes]))
        assert torch.equal(t, traj.timesteps[step].expand(4))


def test_guidance_one_is_a_single_batch(dit, sizes):
    out = sample(dit, labels=[1, 3], guidance=1.0, steps=3, seed=0, record=True, progress=False)
    assert out.calls == 3 and out.trajectory.uncond is None
    x, t, cond = out.trajectory.inputs(1)
    assert x.shape == (2, sizes.channels, 8, 8) and torch.equal(cond, torch.tensor([1, 3])) and t.shape == (2,)


def test_guidance_mixes_cond_and_uncond_predictions(dit, sizes):
    """One DDIM step by hand: pred = uncond + g * (cond - uncond)."""
    g = 2.5
    out = sample(dit, labels=[0, 4], guidance=g, steps=1, seed=9, progress=False)
    sched = make_scheduler(dit, "ddim")
    sched.set_timesteps(1)
    (t,) = sched.timesteps
    x = initial_noise((sizes.channels, 8, 8), 9, 2)
    with torch.no_grad():
        pc = dit(x, t, torch.tensor([0, 4]))
        pu = dit(x, t, dit.null_cond(2))
    expected = sched.step(pu + g * (pc - pu), t, x).prev_sample
    torch.testing.assert_close(out.images, expected, rtol=0, atol=1e-5)


def test_guidance_zero_is_the_unconditional_model(dit, sizes):
    null = sizes.num_classes
    zero = sample(dit, labels=[1, 2], guidance=0.0, steps=3, seed=4, progress=False).images
    uncond = sample(dit, labels=[null, null], guidance=1.0, steps=3, seed=4, progress=False).images
    cond = sample(dit, labels=[1, 2], guidance=1.0, steps=3, seed=4, progress=False).images
    assert float((zero - uncond).abs().max()) <= 1e-4
    assert float((zero - cond).abs().max()) > 1e-3


def test_explicit_uncond_is_used(dit):
    out = sample(dit, labels=[1, 3], uncond=torch.tensor([0, 0]), guidance=2.0, steps=2, record=True,
                 progress=False)
    assert torch.equal(out.trajectory.uncond, torch.tensor([0, 0]))
    assert torch.equal(out.trajectory.inputs(0)[2], torch.tensor([1, 3, 0, 0]))


def test_guidance_with_a_label_conditioner(cond_unet, label_embedding, sizes):
    labels = torch.tensor([0, 4])
    out = sample(cond_unet, labels=labels, guidance=2.0, steps=2, record=True, progress=False)
    traj = out.trajectory
    assert out.images.shape == (2, sizes.channels, 8, 8) and out.calls == 4
    with torch.no_grad():
        assert torch.equal(traj.cond, label_embedding(labels))
        assert torch.equal(traj.uncond, label_embedding(torch.full((2,), sizes.num_classes)))
    x, _, cond = traj.inputs(1)
    assert x.shape == (4, sizes.channels, 8, 8) and cond.shape == (4, sizes.tokens, sizes.dim)


def test_guidance_with_text_states(pixart, sizes):
    cond = torch.randn(2, 120, sizes.caption)
    out = sample(pixart, cond=cond, guidance=3.0, steps=2, record=True, progress=False)
    assert out.calls == 4 and out.labels is None
    assert torch.equal(out.trajectory.cond, cond)
    assert out.trajectory.uncond.shape == (2, 120, sizes.caption) and not out.trajectory.uncond.any()


def test_guidance_with_text_states_of_another_length(pixart, sizes):
    cond = torch.randn(2, 7, sizes.caption)
    out = sample(pixart, cond=cond, guidance=3.0, steps=2, record=True, progress=False)
    assert out.calls == 4 and out.trajectory.uncond.shape == cond.shape


def test_sample_leaves_module_modes_as_they_were(builders):
    den = Denoiser(builders.dit())  # the model is in eval mode, the fresh wrapper in training mode
    before = {name: m.training for name, m in den.named_modules()}
    sample(den, labels=[1, 2], steps=1, progress=False)
    after = {name: m.training for name, m in den.named_modules()}
    assert after == before


# -- errors ----------------------------------------------------------------------------------------
def test_conditional_model_needs_labels_or_cond(dit, cond_unet):
    for den, kind in ((dit, "class"), (cond_unet, "hidden_states")):
        with pytest.raises(DiffpressError, match=rf"this denoiser is conditional \({kind}\); pass labels or cond"):
            sample(den, num_samples=2, steps=2, progress=False)


def test_unknown_scheduler(plain):
    with pytest.raises(DiffpressError, match=r"unknown scheduler 'heun'; allowed: ddim, ddpm, euler, euler-a, dpm\+\+"):
        sample(plain, steps=2, scheduler="heun", progress=False)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(plain, steps):
    with pytest.raises(DiffpressError, match=rf"steps must be >= 1, got {steps}"):
        sample(plain, steps=steps, progress=False)


def test_inconsistent_requests(dit):
    with pytest.raises(DiffpressError, match="either labels or cond, not both"):
        sample(dit, labels=[1], cond=torch.tensor([1]), steps=2, progress=False)
    with pytest.raises(DiffpressError, match="num_samples=3 but 2 conditions were given"):
        sample(dit, labels=[1, 2], num_samples=3, steps=2, progress=False)
    with pytest.raises(DiffpressError, match="record=True keeps one batch; ask for at most batch_size=2"):
        sample(dit, labels=[1, 2, 3], batch_size=2, record=True, steps=2, progress=False)


def test_scheduler_shipped_with_the_checkpoint(builders):
    from diffusers import EulerDiscreteScheduler

    config = dict(EulerDiscreteScheduler(num_train_timesteps=400, prediction_type="v_prediction").config)
    config["_class_name"] = "EulerDiscreteScheduler"
    den = Denoiser(builders.plain(), sample_shape=(2, 8, 8), scheduler_config=config).eval()
    own = make_scheduler(den, None)
    assert type(own).__name__ == "EulerDiscreteScheduler"
    assert own.config.num_train_timesteps == 400 and own.config.prediction_type == "v_prediction"
    ddim = make_scheduler(den, "ddim")  # another sampler keeps the model's noise schedule and prediction type
    assert type(ddim).__name__ == "DDIMScheduler"
    assert ddim.config.num_train_timesteps == 400 and ddim.config.prediction_type == "v_prediction"
    out = sample(den, num_samples=1, steps=3, scheduler=None, record=True, progress=False)
    assert out.trajectory.timesteps[0] == pytest.approx(399.0)


def test_guidance_with_a_clipping_scheduler_warns(cond_unet):
    import warnings

    from diffusers import DDIMScheduler

    den = cond_unet.copy()
    den.scheduler_config = dict(DDIMScheduler(clip_sample=True).config, _class_name="DDIMScheduler")
    with pytest.warns(UserWarning, match="clip_sample=True"):
        sample(den, labels=[0, 1], guidance=2.0, steps=2, progress=False)  # a checkpoint that ships clipping
    for config in (dict(DDIMScheduler(clip_sample=False).config, _class_name="DDIMScheduler"), None):
        den.scheduler_config = config  # None: no scheduler shipped, diffusers' defaults without clipping
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sample(den, labels=[0, 1], guidance=2.0, steps=2, progress=False)
