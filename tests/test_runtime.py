"""The run-time context: the sampler sets the step index and resets it per run; modes; the hook helper."""
import pytest
import torch
from torch import nn

import diffpress
from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext, hooks


def test_sampler_sets_step_index_and_resets_per_run():
    den = diffpress.load("digits-dit")
    seen = []

    def record(module, args):
        rt = den.runtime
        seen.append((rt.runs, rt.step, rt.steps, float(rt.t.reshape(-1)[0]), args[0].shape[0]))

    with hooks([(den.model, "pre", record)]):
        diffpress.sample(den, labels=[1, 2], guidance=3.0, steps=5, progress=False)
        diffpress.sample(den, labels=[3], guidance=1.0, steps=3, progress=False)
    first, second = seen[:5], seen[5:]
    runs = first[0][0]
    assert [s[:3] for s in first] == [(runs, i, 5) for i in range(5)]  # one call per step (CFG doubles the batch)
    assert all(s[4] == 4 for s in first)
    assert [s[:3] for s in second] == [(runs + 1, i, 3) for i in range(3)]  # a new run starts afresh
    assert first[0][3] > first[-1][3]  # timesteps run from high noise to low
    assert (den.runtime.step, den.runtime.steps, den.runtime.t) == (None, None, None)  # outside a sampler again
    assert den.copy().runtime is not den.runtime and den.copy().runtime.runs == den.runtime.runs


def test_quantizers_read_the_denoisers_context_and_copies_keep_their_own():
    den = diffpress.load("digits-dit")
    cs = diffpress.calibrate(den, num_samples=2, steps=4, policy=diffpress.TimestepPolicy("uniform", count=4),
                             progress=False)
    q = den.copy()
    diffpress.quantize_(q, diffpress.QuantizeConfig(timestep_groups=2), cs, progress=False)
    acts = [m for m in q.modules() if type(m).__name__ == "ActQuant"]
    assert acts and all(a.context is q.runtime for a in acts)
    q2 = q.copy()
    assert all(a.context is q2.runtime for a in q2.modules() if type(a).__name__ == "ActQuant")
    x, t, c = den.example_inputs(2, seed=1)
    with torch.no_grad():
        out = q(x, t, c)
        with q.runtime.using(mode="plain"):  # the same numbers as plain arithmetic
            plain = q(x, t, c)
    assert torch.allclose(out, plain, atol=1e-5) and q.runtime.mode == "evaluate"


def test_using_restores_and_checks_modes():
    ctx = RunContext()
    with pytest.raises(DiffpressError, match="mode: 'fast' is not allowed"):
        with ctx.using(mode="fast"):
            pass
    with pytest.raises(ValueError):
        with ctx.using(mode="calibrate", step=3):
            raise ValueError
    assert (ctx.mode, ctx.step) == ("evaluate", None)


def test_hooks_are_removed_when_the_block_fails():
    lin, calls = nn.Linear(2, 2), []
    with pytest.raises(RuntimeError):
        with hooks([(lin, "pre", lambda m, a: calls.append(1)), (lin, "post", lambda m, a, o: calls.append(2))]):
            lin(torch.zeros(1, 2))
            raise RuntimeError("stop")
    lin(torch.zeros(1, 2))
    assert calls == [1, 2] and not lin._forward_hooks and not lin._forward_pre_hooks
