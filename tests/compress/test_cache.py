"""The cache pass: schedules as data, hooks that follow the run-time context, the searches under a MAC budget,
save / reload, export (full-step graph + cached-step graphs + schedule, verified in ONNX Runtime), cache + W8A8."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffpress
from diffpress.compress.cache import CacheConfig, Schedule, cache_, install
from diffpress.errors import DiffpressError
from diffpress.eval.metrics import psnr

STEPS = 10


def _sample(den, steps=STEPS, labels=(1, 4, 7)):
    return diffpress.sample(den, labels=list(labels), steps=steps, guidance=3.0, seed=3, progress=False).images


def _units(den):
    from diffpress.compress.cache import find_units

    found = find_units(den)
    return found, [list(u.modules) for u in found.units], [u.kind for u in found.units]


def _schedule(found, table, steps=STEPS):
    return Schedule(found.names(), [u.macs for u in found.units], found.macs, [u.inside for u in found.units],
                    np.asarray(table, bool), "auto", steps, 3.0).canonical()


@pytest.mark.parametrize("name", ["digits-cond-unet", "digits-dit"])
def test_always_recompute_is_bit_identical(name):
    den = diffpress.load(name)
    ref = _sample(den)
    found, modules, kinds = _units(den)
    install(den, _schedule(found, np.ones((STEPS, len(modules)))), modules, kinds)
    assert torch.equal(_sample(den), ref)


@pytest.mark.parametrize("name", ["digits-cond-unet", "digits-dit"])
def test_reuse_changes_little_and_resets_between_runs(name):
    den = diffpress.load(name)
    ref = _sample(den)
    found, modules, kinds = _units(den)
    table = np.ones((STEPS, len(modules)), bool)
    table[1::2] = False  # every other step reuses every unit
    s = _schedule(found, table)
    install(den, s, modules, kinds)
    first, second = _sample(den), _sample(den)
    assert torch.equal(first, second)  # the cache starts empty in every sampling run
    assert not torch.equal(first, ref) and 18 < psnr(ref, first) < 80
    assert s.macs_fraction() < 0.6
    # outside a sampler every unit computes: one call equals the uncached model
    plain = diffpress.load(name)
    x, t, c = den.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(den(x, t, c), plain(x, t, c))


def test_residual_reuse_keeps_the_fresh_input():
    den = diffpress.load("digits-dit")
    found, modules, kinds = _units(den)
    table = np.ones((2, 4), bool)
    table[1, 1] = False  # step 1 reuses block 1's residual
    install(den, _schedule(found, table, steps=2), modules, kinds)
    seen = {}
    block = den.get_submodule("model.transformer_blocks.1")
    def keep(module, args, out):
        seen[den.runtime.step] = (args[0], out)

    handle = block.register_forward_hook(keep)
    try:
        _sample(den, steps=2)
    finally:
        handle.remove()
    (in0, out0), (in1, out1) = seen[0], seen[1]
    assert torch.allclose(out1, in1 + (out0 - in0), atol=1e-6) and not torch.equal(in0, in1)


def test_schedule_math_and_picture():
    s = Schedule(["a", "b"], [60, 30], 100, [(1,), ()], np.ones((4, 2), bool), "ddim", 4)
    t = s.table.copy()
    t[1:, 1] = False
    assert s.macs_fraction(t) == pytest.approx((100 + 3 * 70) / 400)
    t[2, 0] = False  # reusing a also skips b: saves 60, not 90
    c = s.with_table(t)
    assert c.step_macs().tolist() == [100, 70, 40, 70] and len(c.patterns()) == 2
    assert c.picture().splitlines() == ["a ##.#", "b #..."]
    assert Schedule.from_dict(json.loads(json.dumps(c.to_dict()))).to_dict() == c.to_dict()


@pytest.mark.parametrize("search", ["uniform", "greedy", "search"])
def test_searches_meet_the_budget(search):
    den = diffpress.load("digits-dit")
    r = cache_(den, CacheConfig(budget=0.5, search=search, steps=STEPS, samples=4, holdout=4, time_budget=4,
                                max_patterns=3), progress=False)
    assert r.macs_fraction <= 0.5 and len(r.schedule.patterns()) <= 3
    assert r.schedule.table[0].all() and r.schedule.table.shape == (STEPS, 4)
    assert np.isfinite(r.search_psnr) and np.isfinite(r.holdout_psnr) and r.search_psnr > 15
    if search == "search":  # local search starts from the best of uniform and greedy and only keeps improvements
        assert r.search_psnr >= max(c["psnr"] for k, c in r.candidates.items() if k != "search") - 1e-9
    rec = den.compression[-1]
    assert rec["pass"] == "cache" and rec["schedule"]["table"] == r.schedule.table.astype(int).tolist()
    assert "schedule (# recompute, . reuse)" in r.summary()


def test_fixed_interval_needs_no_sampling():
    den = diffpress.load("digits-cond-unet")
    r = cache_(den, CacheConfig(search="uniform", interval=3, branch=1, holdout=0, steps=STEPS), progress=False)
    t = r.schedule.table
    assert t[::3].all() and not t[1::3, 1:].any() and t[1::3, 0].all()  # level 1 and deeper reuse, level 0 computes
    assert r.evaluations == 0 and np.isnan(r.holdout_psnr)


def test_config_and_schedule_errors():
    with pytest.raises(DiffpressError, match="budget"):
        CacheConfig(budget=1.5)
    with pytest.raises(DiffpressError, match="search"):
        CacheConfig(search="random")
    with pytest.raises(DiffpressError, match="interval"):
        CacheConfig(interval=3)
    with pytest.raises(DiffpressError, match="out of reach"):
        cache_(diffpress.load("digits-cond-unet"), CacheConfig(budget=0.05, steps=STEPS), progress=False)
    den = diffpress.load("digits-dit")
    cache_(den, CacheConfig(search="uniform", interval=2, holdout=0, steps=STEPS), progress=False)
    with pytest.raises(DiffpressError, match="for 10 sampling steps.*steps=10"):
        _sample(den, steps=12)
    with pytest.raises(DiffpressError, match="cache runs once"):
        cache_(den, CacheConfig(search="uniform", interval=2, holdout=0, steps=STEPS), progress=False)


def test_save_reload_is_bit_identical(tmp_path):
    den = diffpress.load("digits-cond-unet")
    cache_(den, CacheConfig(search="uniform", interval=3, holdout=0, steps=STEPS), progress=False)
    den.save_pretrained(tmp_path / "m")
    back = diffpress.load(tmp_path / "m")
    assert back.compression[-1]["schedule"] == den.compression[-1]["schedule"]
    assert torch.equal(_sample(back), _sample(den))


@pytest.mark.parametrize("name", ["digits-cond-unet", "digits-dit"])
def test_onnx_export_reproduces_the_cached_model(tmp_path, name):
    from diffpress.deploy import sample as ort_sample

    den = diffpress.load(name)
    table = np.ones((STEPS, 1), bool)
    found, modules, kinds = _units(den)
    table = np.ones((STEPS, len(modules)), bool)
    table[1::3, 0] = False  # the shallowest unit (a DiT's first block)
    table[2::3, -1] = False  # the deepest unit (a DiT's last block)
    install(den, _schedule(found, table), modules, kinds)
    den.compression.append({"pass": "cache", "config": {}, "kinds": kinds, "modules": modules,
                            "schedule": den.cache_state.schedule.to_dict()})
    res = diffpress.export_onnx(den, tmp_path / "onnx")
    spec = res.spec
    names = [g["name"] for g in spec["graphs"]]
    assert names[:3] == ["model", "cached_0", "cached_1"] and res.verification["passed"]
    sched = json.loads((tmp_path / "onnx" / "cache_schedule.json").read_text())
    assert sched["graph_per_step"][:4] == ["model", "cached_0", "cached_1", "model"]
    main = next(g for g in spec["graphs"] if g["name"] == "model")
    assert next(o["name"] for o in main["outputs"]) == "out_sample" and len(main["outputs"]) > 1
    for g in sched["graphs"].values():  # every cache input is some graph's output
        assert set(g["inputs"]) <= {o for h in sched["graphs"].values() for o in h["outputs"]}
    if name == "digits-cond-unet":  # DeepCache's shallowest branch reads one tensor
        assert len(sched["graphs"]["cached_0"]["inputs"]) == 1
    ref = _sample(den)
    got = ort_sample(tmp_path / "onnx", labels=[1, 4, 7], steps=STEPS, guidance=3.0, seed=3, progress=False).images
    assert psnr(ref, got) > 80  # float graphs: the ORT loop equals the PyTorch cached model
    ts = diffpress.export_torchscript(den, tmp_path / "ts")
    assert ts["verification"]["passed"] and len(ts["graphs"]) == len(names)


def test_cache_after_w8a8_refits_quantizers():
    from diffpress.calibration import TimestepPolicy, collect
    from diffpress.compress import QuantizeConfig, quantize_
    from diffpress.compress.quant import ActQuant

    den = diffpress.load("digits-dit")
    cs = collect(den, num_samples=4, steps=STEPS, policy=TimestepPolicy("uniform", count=3), progress=False)
    quantize_(den, QuantizeConfig(), cs, progress=False)
    before = {n: m.scale.clone() for n, m in den.named_modules() if isinstance(m, ActQuant)}
    r = cache_(den, CacheConfig(search="uniform", interval=2, holdout=2, samples=2), cs, progress=False)
    assert r.schedule.steps == STEPS  # the calibration set's sampling
    assert r.quantizers["refitted"] == len(before) > 0
    after = {n: m.scale for n, m in den.named_modules() if isinstance(m, ActQuant)}
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert [p["pass"] for p in den.compression] == ["quantize", "cache"]


def test_recipes_validate():
    from diffpress.recipes import load_recipe

    for name in ("cache", "cache-w8a8"):
        r = load_recipe(name)
        assert r.passes[-1].name == "cache" and r.evaluation.steps == r.calibration.steps
