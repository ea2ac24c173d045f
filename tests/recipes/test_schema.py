"""Recipe schema: built-ins, validation against the config dataclasses, overrides, pass ordering."""
from dataclasses import dataclass

import pytest
import yaml

from diffpress import DiffpressError, QuantizeConfig, ReconstructConfig
from diffpress.compress import registry
from diffpress.compress.registry import PassSpec
from diffpress.recipes.schema import builtin_recipes, dump_recipe, from_data, load_recipe

MINIMAL = {"version": 1, "passes": [{"pass": "quantize"}], "exports": [{"format": "onnx"}]}


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(source, overrides=()):
    with pytest.raises(DiffpressError) as info:
        load_recipe(source, overrides)
    return str(info.value)


def test_builtin_recipes_are_the_designed_ones():
    assert {"w8a8", "w4a8", "fast"} <= set(builtin_recipes())
    w8, w4, fast = (load_recipe(n) for n in ("w8a8", "w4a8", "fast"))
    for r, bits in ((w8, "int8"), (w4, "int4"), (fast, "int8")):
        (step,) = r.passes
        assert step.name == "quantize" and r.description
        assert (step.config.weights, step.config.group_size, step.config.activations) == (bits, None, "int8")
        assert [(e.format, e.opset, e.dynamic_batch) for e in r.exports] == [("onnx", 21, True),
                                                                            ("torchscript", None, False)]
        assert r.calibration.samples == 64 and r.calibration.steps == 50 and r.calibration.seed == 1000
        assert (r.calibration.policy.kind, r.calibration.policy.count) == ("uniform", 10)
        assert "ort_speed" in r.evaluation.metrics and r.evaluation.seed + r.evaluation.samples <= 1000
    assert w8.passes[0].config.reconstruct == ReconstructConfig(time_budget=60)
    assert w4.passes[0].config.reconstruct == ReconstructConfig(time_budget=60)
    assert fast.passes[0].config.reconstruct is None
    assert (w8.name, fast.name) == ("w8a8", "fast")


def test_resolved_recipe_round_trips_with_every_default(tmp_path):
    r = load_recipe("w8a8", ["passes.0.timestep_groups=2"])
    text = dump_recipe(r)
    data = yaml.safe_load(text)
    assert data["passes"][0]["timestep_groups"] == 2 and data["passes"][0]["reconstruct"]["iters"] == 500
    assert data["exports"][1] == {"format": "torchscript", "opset": None, "dtype": "float32", "dynamic_batch": False,
                                  "batch": 2, "target": None, "rtol": None}
    assert data["calibration"]["conditions"] == {"kind": "auto", "path": None, "pipeline": None}
    assert set(data["calibration"]["policy"]) == {"kind", "count", "mean", "std", "steps", "seed"}
    assert load_recipe(write(tmp_path, text, "resolved.yaml")) == r


def test_defaults_fill_a_minimal_recipe(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL, "mini.yaml"))
    assert r.name == "mini" and r.passes[0].config == QuantizeConfig()
    assert r.calibration.sampler == "auto" and r.evaluation.samples == 100


@pytest.mark.parametrize("patch, message", [
    ({"passes": [{"pass": "quantize", "weghts": "int4"}]},
     "passes.0.weghts: unknown key (did you mean 'weights'?); allowed: pass, weights, group_size"),
    ({"calibration": {"samples": "many"}}, "calibration.samples: expected int, got str 'many'"),
    ({"passes": [{"pass": "quantize", "weights": 4}]}, "passes.0.weights: expected str, got int 4; allowed: int8, int4"),
    ({"calibration": {"policy": {"kind": 1}}}, "calibration.policy.kind: expected str, got int 1; allowed: uniform, all"),
    ({"description": 3}, "description: expected str, got int 3"),
    ({"passes": [{"pass": "quantize", "weights": "int3"}]}, "passes.0.weights: 'int3' is not allowed; allowed: int8, int4"),
    ({"passes": [{"pass": "quantize", "reconstruct": {"iters": "x"}}]},
     "passes.0.reconstruct.iters: expected int, got str 'x'"),
    ({"passes": [{"pass": "quantize", "reconstruct": {"time_budget": -1}}]},
     "passes.0.reconstruct.time_budget: must be positive seconds or null, got -1"),
    ({"passes": [{"pass": "quantize", "reconstruct": {"beta": [1.0]}}]}, "passes.0.reconstruct.beta: expected [float, float]"),
    ({"passes": [{"pass": "quantize", "group_size": "x"}]}, "passes.0.group_size: expected int or null, got str 'x'"),
    ({"passes": [{"pass": "quantize", "skip_roles": ["decoder"]}]}, "passes.0.skip_roles: 'decoder' is not allowed"),
    ({"passes": [{"pass": "quantize", "percentile": True}]}, "passes.0.percentile: expected float, got bool True"),
    ({"passes": [{"pass": "distill"}]}, "passes.0.pass: unknown pass 'distill'; allowed: prune, lowrank, quantize, cache"),
    ({"passes": [{"weights": "int8"}]}, "passes.0: missing key 'pass'"),
    ({"passes": []}, "passes: empty; name at least one pass"),
    ({"passes": [{"pass": "quantize"}, {"pass": "quantize"}]}, "passes.1: quantize may run once per recipe"),
    ({"calibration": {"policy": {"kind": "gaussian"}}}, "calibration.policy: unknown timestep policy 'gaussian'"),
    ({"calibration": {"sampler": "heun"}}, "calibration.sampler: 'heun' is not allowed; allowed: auto, model, null, ddim"),
    ({"calibration": 5}, "calibration: expected a section (a mapping with keys sampler, steps"),
    ({"evaluation": {"metrics": ["psnr", "lpips"]}}, "evaluation.metrics: 'lpips' is not allowed; allowed: psnr"),
    ({"evaluation": {"seed": 1000}}, "evaluation.seed: the evaluation seeds 1000..1099 overlap the calibration seeds"),
    ({"exports": [{"format": "tflite"}]}, "exports.0.format: 'tflite' is not allowed; allowed: onnx, torchscript"),
    ({"exports": [{"format": "torchscript", "opset": 17}]}, "exports.0.opset: TorchScript has no opset"),
    ({"exports": [{"format": "onnx"}, {"format": "onnx", "opset": 20}]}, "exports.1: a second onnx export"),
    ({"exports": [{"format": "torchscript"}]}, "evaluation.metrics: ort_speed times the ONNX export"),
    ({"passes": [{"pass": "quantize", "weights": "int4"}], "exports": [{"format": "onnx", "opset": 20}]},
     "exports.0.opset: int4 weights need opset >= 21"),
    ({"passes": [{"pass": "quantize", "reconstruct": {"lr": "1e-3"}}]},
     "passes.0.reconstruct.lr: expected float, got str '1e-3' (YAML reads 1e-3 as text"),
    ({"version": 2}, "version: 2 is not supported by this diffpress; allowed: 1"),
    ({"extra": 1}, "extra: unknown key; allowed: version, name, description, calibration, passes"),
])
def test_bad_recipes_name_file_key_path_and_allowed_values(tmp_path, patch, message):
    path = write(tmp_path, {**MINIMAL, **patch})
    err = error_of(path)
    assert err.startswith(f"{path}: ") and message in err


def test_file_level_errors(tmp_path):
    assert "missing key 'version'; add 'version: 1'" in error_of(write(tmp_path, {"passes": [{"pass": "quantize"}]}))
    assert "not valid YAML" in error_of(write(tmp_path, "passes: [", "broken.yaml"))
    assert "a recipe is a mapping" in error_of(write(tmp_path, "- 1\n", "list.yaml"))
    err = error_of("w9a9")
    assert "unknown recipe 'w9a9'; built-in recipes: cache-w8a8, cache, fast, prune30-w8a8, prune30, w4a4-lowrank, w4a8-lowrank, w4a8, w8a8" in err
    assert f"no recipe file at {tmp_path / 'nope.yaml'}" in error_of(tmp_path / "nope.yaml")


def test_overrides():
    r = load_recipe("w8a8", ["passes.0.weights=int4", "passes.0.reconstruct=null", "evaluation.metrics=[psnr]",
                             "calibration.policy.count=3", "exports=[{format: onnx}]"])
    q = r.passes[0].config
    assert (q.weights, q.reconstruct, r.evaluation.metrics, r.calibration.policy.count) == ("int4", None, ["psnr"], 3)
    assert [e.format for e in r.exports] == ["onnx"]
    # a sub-key of a null section turns it on with that setting
    assert load_recipe("fast", ["passes.0.reconstruct.iters=7"]).passes[0].config.reconstruct == ReconstructConfig(iters=7)
    # later overrides win
    assert load_recipe("fast", ["evaluation.samples=5", "evaluation.samples=6"]).evaluation.samples == 6


@pytest.mark.parametrize("override, message", [
    ("passes.0.weghts=int4", "--set passes.0.weghts=int4: passes.0.weghts: unknown key (did you mean 'weights'?)"),
    ("calibraton.steps=5", "--set calibraton.steps=5: calibraton: unknown key (did you mean 'calibration'?)"),
    ("passes.3.weights=int4", "--set passes.3.weights=int4: passes.3: no entry 3; the list has 1 (indices 0..0)"),
    ("passes.x.weights=int4", "--set passes.x.weights=int4: passes.x: expected a list index (0..0)"),
    ("calibration.steps.x=1", "--set calibration.steps.x=1: calibration.steps: is int 50, not a section"),
    ("calibration.samples=many", "--set calibration.samples=many: calibration.samples: expected int, got str 'many'"),
    ("passes.0.weights", "--set passes.0.weights: expected KEY=VALUE"),
    ("passes.0.skip=[a", "--set passes.0.skip=[a: the value is not valid YAML"),
])
def test_bad_overrides_name_the_set(override, message):
    assert message in error_of("fast", [override])


def test_pass_order_rules(monkeypatch, tmp_path):
    @dataclass
    class PruneConfig:
        amount: float = 0.5

    @dataclass
    class CacheConfig:
        interval: int = 2

    def noop(den, config, calibration, progress):
        return None

    monkeypatch.setitem(registry.PASSES, "prune", PassSpec("prune", PruneConfig, noop))
    monkeypatch.setitem(registry.PASSES, "cache", PassSpec("cache", CacheConfig, noop, after=("quantize",), last=True))
    ok = load_recipe(write(tmp_path, {**MINIMAL, "passes": [{"pass": "prune", "amount": 0.25}, {"pass": "quantize"},
                                                               {"pass": "cache"}]}))
    assert [p.name for p in ok.passes] == ["prune", "quantize", "cache"] and ok.passes[0].config.amount == 0.25
    assert ok.passes[0].to_recipe() == {"pass": "prune", "amount": 0.25}
    for order, message in (
            (["quantize", "prune"], "passes.0: quantize must come after prune (passes.1); order the passes as "
                                    "prune -> lowrank -> quantize -> cache"),
            (["cache", "prune"], "passes.0: cache must be the last pass, but passes.1 (prune) follows it"),
            (["prune", "cache", "quantize"], "passes.1: cache must come after quantize (passes.2)"),
    ):
        path = write(tmp_path, {**MINIMAL, "passes": [{"pass": p} for p in order]}, "bad.yaml")
        assert f"{path}: {message}" in error_of(path)
    # the same rules apply to overrides
    assert "--set passes=[{pass: quantize}, {pass: prune}]: passes.0: quantize must come after prune" in \
        error_of("fast", ["passes=[{pass: quantize}, {pass: prune}]"])
    assert "passes.0.amount: expected float, got str 'lots'" in error_of(
        write(tmp_path, {**MINIMAL, "passes": [{"pass": "prune", "amount": "lots"}]}, "p.yaml"))


def test_from_data_is_the_python_entry():
    r = from_data({**MINIMAL, "passes": [{"pass": "quantize", "timestep_groups": 2}]}, "inline")
    assert r.passes[0].config.timestep_groups == 2 and r.name is None
    with pytest.raises(DiffpressError, match="^inline: passes.0.timestep_groups: must be >= 1, got 0$"):
        from_data({**MINIMAL, "passes": [{"pass": "quantize", "timestep_groups": 0}]}, "inline")
