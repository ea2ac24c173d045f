"""The prune pass: MAC target, importance, save / reload, export, recovery, recipes."""
import pytest
import torch

import diffpress
from diffpress import export_onnx, export_torchscript
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.compress.prune import PruneConfig, prune_
from diffpress.errors import DiffpressError
from diffpress.recipes.schema import load_recipe


@pytest.fixture(scope="module")
def dit_cal():
    den = diffpress.load("digits-dit")
    return den, diffpress.calibrate(den, num_samples=4, steps=6, progress=False)


def test_target_is_met_within_one_bundle(dit_cal):
    den, _ = dit_cal
    for target in (0.3, 0.5):
        small = den.copy()
        r = prune_(small, PruneConfig(target=target, importance="magnitude"), progress=False)
        cut = 1 - r.macs_after / r.macs_before
        assert target <= cut <= target + 8 * r.largest_unit_macs / r.macs_before, (target, cut)
        assert diffpress.graph.capture(small, batch=1).macs == pytest.approx(r.macs_after, rel=1e-6)
        assert r.params_after < r.params_before
        heads = {m.heads for m in small.modules() if type(m).__name__ == "Attention"}
        assert min(heads) >= 1


def test_taylor_importance_uses_the_trajectory(dit_cal):
    den, cal = dit_cal
    a, b = den.copy(), den.copy()
    ra = prune_(a, PruneConfig(target=0.3, importance="taylor", samples=32), cal, progress=False)
    rb = prune_(b, PruneConfig(target=0.3, importance="diff_pruning", threshold=0.9, samples=32), cal, progress=False)
    assert ra.importance_steps >= 2  # every sampled timestep
    assert 1 <= rb.importance_steps < ra.importance_steps  # Diff-Pruning stops once the loss falls
    with pytest.raises(DiffpressError, match="needs calibration data"):
        prune_(den.copy(), PruneConfig(importance="taylor"), None, progress=False)


def test_save_reload_is_bit_identical_and_exports(tmp_path, dit_cal):
    den, cal = dit_cal
    small = den.copy()
    prune_(small, PruneConfig(target=0.3, importance="magnitude"), progress=False)
    small.save_pretrained(tmp_path / "m")
    back = diffpress.load(tmp_path / "m")
    ex = small.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(back(*ex), small(*ex))
    res = export_onnx(back, tmp_path / "onnx", batch=2)
    assert res.verification["passed"] and res.verification["rel_rms_diff"] < 1e-4
    export_torchscript(back, tmp_path / "ts")
    quantize_(back, QuantizeConfig(), cal, progress=False)  # pruned, then quantized
    res = export_onnx(back, tmp_path / "q", batch=2)
    assert res.verification["passed"] and res.ort_op_types.get("QLinearMatMul", 0) + \
        res.ort_op_types.get("MatMulInteger", 0) + res.ort_op_types.get("DequantizeLinear", 0) > 0


def test_recovery_keeps_the_best_held_out_state(dit_cal):
    den, cal = dit_cal
    small = den.copy()
    r = prune_(small, PruneConfig(target=0.5, importance="magnitude", recover={"time_budget": 6, "steps": 30,
                                                                                "eval_every": 5}),
               cal, progress=False)
    log = r.recovery
    assert log["steps"] <= 30 and log["seconds"] < 30
    assert log["best"] <= log["initial"] and log["best"] == min(h[2] for h in log["history"])
    assert small.compression[-1]["report"]["recovery"]["best"] == log["best"]


def test_config_errors_and_recipes():
    with pytest.raises(DiffpressError, match="target"):
        PruneConfig(target=1.5)
    with pytest.raises(DiffpressError, match="importance"):
        PruneConfig(importance="random")
    with pytest.raises(DiffpressError, match="granularity"):
        PruneConfig(granularity=["blocks"])
    r = load_recipe("prune30-w8a8")
    assert [p.name for p in r.passes] == ["prune", "quantize"]
    assert r.passes[0].config.recover.time_budget == 300
    assert load_recipe("prune30").passes[0].config.target == 0.3


def test_granularity_and_protected_layers(dit_cal):
    den, _ = dit_cal
    heads_only = den.copy()
    r = prune_(heads_only, PruneConfig(target=0.1, importance="magnitude", granularity=["heads"]), progress=False)
    assert r.units_removed["heads"] > 0 and r.units_removed["channels"] == r.units_removed["groups"] == 0
    kept = den.copy()
    r = prune_(kept, PruneConfig(target=0.2, importance="magnitude", skip=["*attn1*"]), progress=False)
    assert not any("attn1" in layer["name"] for layer in r.layers) and r.layers
    assert any(s["reason"].startswith("matches skip pattern") for s in r.skipped)
