"""Generated recipes (seeded): every one loads or ends in a DiffpressError, none hangs."""
import copy
import random
import time

import yaml

from diffpress.errors import DiffpressError
from diffpress.recipes.schema import builtin_recipes, from_data, load_recipe

CASES = 1500
KEYS = ["version", "name", "description", "calibration", "passes", "exports", "evaluation", "pass", "weights",
        "activations", "group_size", "timestep_groups", "reconstruct", "iters", "time_budget", "beta", "policy",
        "kind", "count", "steps", "samples", "metrics", "format", "opset", "seed", "skip", "skip_roles", "sampler",
        "guidance", "dynamic_batch", "batch", "granularity", "percentile", "act_rule", "bias_correction", "x"]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 7, 21, 10 ** 12, -(10 ** 18)])
    if kind == 3:
        return rng.choice([0.0, 0.5, -2.5, 1e300, float("inf"), float("nan")])
    if kind == 4:
        return rng.choice(["", "int4", "int8", "uniform", "onnx", "ddim", "quantize", "prune", "mse", "block", "\0",
                           "1e-3", "null", "x" * 300])
    if kind in (5, 6, 7):
        return rng.choice(KEYS)
    if kind in (8, 9):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(data, rng: random.Random, depth: int = 0):
    if isinstance(data, dict) and data:
        key = rng.choice(list(data))
        op = rng.randrange(4)
        if op == 0:
            del data[key]
        elif op == 1:
            data[rng.choice(KEYS)] = _value(rng)
        elif op == 2 and depth < 4:
            _mutate(data[key], rng, depth + 1)
        else:
            data[key] = _value(rng)
    elif isinstance(data, list) and data:
        i = rng.randrange(len(data))
        if rng.random() < 0.5 and depth < 4:
            _mutate(data[i], rng, depth + 1)
        else:
            data[i] = _value(rng)


def test_generated_recipes_load_or_fail_cleanly():
    rng = random.Random(1234)
    bases = [yaml.safe_load(p.read_text()) for p in builtin_recipes().values()]
    load_recipe("w8a8")  # one-time imports (onnxscript's opset list) are not a case's time
    clean = ok = 0
    slowest = 0.0
    for i in range(CASES):
        data = copy.deepcopy(rng.choice(bases))
        for _ in range(rng.randrange(1, 4)):
            _mutate(data, rng)
        overrides = []
        if i % 3 == 0:
            key = ".".join(str(rng.choice(KEYS + ["0", "1"])) for _ in range(rng.randrange(1, 4)))
            overrides = [f"{key}={yaml.safe_dump(_value(rng), default_flow_style=True).strip()}",
                         rng.choice(["passes.0.weights=int4", "=", "x", "passes.9.x=1", "exports=[]"])]
        t0 = time.perf_counter()
        try:
            if overrides:
                load_recipe("fast", overrides)
            else:
                from_data(data, f"case {i}")
            ok += 1
        except DiffpressError as exc:
            assert str(exc), f"case {i}: an empty message"
            clean += 1
        slowest = max(slowest, time.perf_counter() - t0)
    print(f"{CASES} cases: {ok} loaded, {clean} clean errors, slowest {slowest:.3f} s")
    assert ok + clean == CASES and clean > CASES // 2 and ok > 10
    # a guard against pathological inputs (alias bombs, huge counts), not a speed target: loading is milliseconds
    assert slowest < 10.0, f"slowest case took {slowest:.2f} s"
