"""The lowrank pass: smoothing exact in float, branch + residual = weight, refinement never worse, save / reload,
LoRA without requantizing, ONNX op types and ONNX Runtime numerics, a recipe run."""
import json

import onnx
import pytest
import torch
from safetensors.torch import save_file

import diffpress
from diffpress import DiffpressError
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress.lora import apply_lora
from diffpress.compress.lowrank import LowRankConfig, LowRankLayer, lowrank_
from diffpress.compress.quantize import QuantizeConfig, quantize_
from diffpress.recipes.schema import load_recipe

W4A4 = dict(weights="int4", group_size=16, activations="int4", act_mode="dynamic", act_group_size=16)
W4A8 = dict(weights="int4", group_size=16, activations="int8", act_mode="static")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup(make_quant_unet):
    den = make_quant_unet()
    cs = collect(den, num_samples=4, steps=10, policy=TimestepPolicy("uniform", count=3), progress=False)
    x, t, c = den.example_inputs(3, seed=5)
    with torch.no_grad():
        ref = den(x, t, c)
    return den, cs, (x, t, c), ref


@pytest.fixture(scope="module")
def absorbed(setup):
    den, cs, inputs, ref = setup
    d = den.copy()
    report = lowrank_(d, LowRankConfig(rank=4, max_fraction=None, **W4A4), cs, progress=False)
    return d, report


def test_smoothing_alone_is_exact_in_float(setup):
    den, cs, inputs, ref = setup
    d = den.copy()
    report = lowrank_(d, LowRankConfig(rank=0, alpha=0.5, **W4A4), cs, progress=False)
    assert report.layers and all(layer["rank"] == 0 and layer["alpha"] == 0.5 for layer in report.layers)
    where = {layer["smooth"].split(" ")[0] for layer in report.layers}
    assert where == {"folded", "mul"}  # attention / feed-forward inputs after a LayerNorm fold, convs keep a Mul
    with torch.no_grad():
        assert _rel(d(*inputs), ref) < 1e-5


def test_branch_plus_residual_is_the_weight_and_refinement_never_worsens(setup, absorbed):
    den, cs, inputs, ref = setup
    d, report = absorbed
    kinds = {layer["kind"] for layer in report.layers}
    assert kinds == {"linear", "conv2d"}
    for layer in report.layers:
        assert layer["err_lowrank"] <= layer["err_svd"] + 1e-12
        assert layer["err_lowrank"] < layer["err_rtn"]
        m, orig = d.get_submodule(layer["name"]), den.get_submodule(layer["name"])
        assert isinstance(m, LowRankLayer) and m.rank == layer["rank"] == 4
        br = m.branch
        low = br.up.reshape(br.up.shape[0], -1) @ br.down.reshape(br.rank, -1)
        w = (m.residual.weight.reshape(low.shape) + low).reshape(orig.weight.shape)
        s = (1 / m.inv_smooth).view([1, -1] + [1] * (w.dim() - 2))
        assert torch.allclose(w / s, orig.weight, atol=1e-5 * float(orig.weight.detach().abs().max()))
    with torch.no_grad():  # unquantized, the whole model is the original function
        assert _rel(d(*inputs), ref) < 1e-5


def test_lowrank_beats_smoothing_alone_after_quantization(setup, absorbed):
    den, cs, inputs, ref = setup
    errs = {}
    for name, cfg in (("rtn", None), ("smooth", LowRankConfig(rank=0, **W4A4)), ("lowrank", None)):
        d = absorbed[0].copy() if name == "lowrank" else den.copy()
        if cfg is not None:
            lowrank_(d, cfg, cs, progress=False)
        quantize_(d, QuantizeConfig(group_fallback="per_channel", quantize_outputs=False, **W4A4), cs, progress=False)
        with torch.no_grad():
            errs[name] = _rel(d(*inputs), ref)
    assert errs["lowrank"] < errs["smooth"] and errs["lowrank"] < errs["rtn"]


def test_save_reload_is_exact_and_the_quantizer_leaves_the_branch_in_float(absorbed, setup, tmp_path):
    den, cs, inputs, ref = setup
    d = absorbed[0].copy()
    report = quantize_(d, QuantizeConfig(group_fallback="per_channel", **W4A8), cs, progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert any(n.endswith(".branch") and "low-rank branch" in r for n, r in reasons.items())
    assert any(q["name"].endswith(".residual") and q["group_size"] == 16 for q in report.quantized)
    d.save_pretrained(tmp_path / "m")
    again = diffpress.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(*inputs), d(*inputs))
    assert [r["pass"] for r in again.compression] == ["lowrank", "quantize"]


def test_lora_joins_the_branch_without_requantizing(setup, absorbed, tmp_path):
    den, cs, inputs, ref = setup
    d = absorbed[0].copy()
    quantize_(d, QuantizeConfig(group_fallback="per_channel", quantize_outputs=False, **W4A4), cs, progress=False)
    name = next(layer["name"] for layer in absorbed[1].layers if layer["kind"] == "linear")
    key = name.removeprefix("model.")
    base = den.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, base.in_features, generator=gen) * 0.3, torch.randn(base.out_features, 2, generator=gen) * 0.3
    save_file({f"unet.{key}.lora_A.weight": a, f"unet.{key}.lora_B.weight": b}, str(tmp_path / "lora.safetensors"))
    layer = d.get_submodule(name)
    residual_before = {k: v.clone() for k, v in layer.residual.state_dict().items()}
    x = torch.randn(5, base.in_features, generator=gen)
    with torch.no_grad():
        before = layer(x)
        assert apply_lora(d, tmp_path / "lora.safetensors") == [name]
        after = layer(x)
    # the layer gained exactly B A x (x in the original model's terms: a smoothing factor folded into the norm
    # above has divided the layer's input by s); the quantized residual did not change
    original = x if layer.smooth_in_graph else x / layer.inv_smooth
    assert torch.allclose(after - before, original @ (b @ a).t(), atol=1e-4)
    assert all(torch.equal(v, layer.residual.state_dict()[k]) for k, v in residual_before.items())
    assert layer.rank == 4 + 2 and next(r for r in d.compression if r["pass"] == "lowrank")["layers"]
    # the merged model equals float + LoRA up to the quantization error it already had
    f = den.copy()
    apply_lora(f, tmp_path / "lora.safetensors")
    q0 = absorbed[0].copy()
    quantize_(q0, QuantizeConfig(group_fallback="per_channel", quantize_outputs=False, **W4A4), cs, progress=False)
    with torch.no_grad():
        err_lora, err_plain = _rel(d(*inputs), f(*inputs)), _rel(q0(*inputs), ref)
    assert err_lora < 1.5 * err_plain
    d.save_pretrained(tmp_path / "m")  # the grown rank is saved
    with torch.no_grad():
        assert torch.equal(diffpress.load(tmp_path / "m")(*inputs), d(*inputs))
    with pytest.raises(DiffpressError, match="names no layer"):
        save_file({"nope.lora_A.weight": a, "nope.lora_B.weight": b}, str(tmp_path / "bad.safetensors"))
        apply_lora(d, tmp_path / "bad.safetensors")


def test_onnx_export_branch_in_float_beside_int4_residual(absorbed, setup, tmp_path):
    den, cs, inputs, ref = setup
    d = absorbed[0].copy()
    quantize_(d, QuantizeConfig(group_fallback="per_channel", quantize_outputs=False, **W4A4), cs, progress=False)
    res = diffpress.export_onnx(d, tmp_path / "onnx", opset=21)
    assert res.verification["passed"] and res.verification["rel_rms_diff"] < 1e-3
    model = onnx.load(tmp_path / "onnx" / "model.onnx")
    ops = [n.op_type for n in model.graph.node]
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == sum(1 if r["split"] is None else 2 for r in d.compression[1]["layers"] if r["weight_bits"] == 4)
    assert ops.count("Round") >= len(int4)  # dynamic per-token activation quantization, in float arithmetic
    assert ops.count("MatMul") + ops.count("Gemm") >= 2 * sum(r["kind"] == "linear" for r in absorbed[1].layers)
    spec = json.loads((tmp_path / "onnx" / "io_spec.json").read_text())
    assert spec["quantized"] and spec["int4_initializers"] == len(int4)
    ts = diffpress.export_torchscript(d, tmp_path / "ts")
    assert ts["verification"]["passed"]


def test_recipes_check_that_lowrank_simulates_the_quantizers_quantize_builds(tiny_digits_dit, tmp_path):
    for name in ("w4a4-lowrank", "w4a8-lowrank"):
        recipe = load_recipe(name)
        assert [p.name for p in recipe.passes] == ["lowrank", "quantize"]
    with pytest.raises(DiffpressError, match="lowrank.activations is 'int4' but quantize.activations is 'int8'"):
        load_recipe("w4a4-lowrank", ["passes.1.activations=int8", "passes.1.act_mode=static"])
    with pytest.raises(DiffpressError, match="must come after lowrank"):
        load_recipe("w4a4-lowrank", ["passes=[{pass: quantize}, {pass: lowrank}]"])
    tiny = ["calibration.samples=4", "calibration.steps=6", "calibration.policy.count=3", "evaluation.samples=4",
            "evaluation.steps=6", "evaluation.metrics=[psnr, size]", "exports=[]", "passes.0.rank=4",
            "passes.0.alpha_grid=[0.5]", "passes.0.group_size=16", "passes.1.group_size=16",
            "passes.0.act_group_size=16", "passes.1.act_group_size=16"]
    res = diffpress.run_recipe("w4a4-lowrank", tiny_digits_dit, tmp_path / "out", overrides=tiny, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["lowrank", "quantize"]
    assert report["passes"][0]["summary"].startswith("lowrank: ") and report["passes"][0]["layers"]
    assert report["headline"]["psnr"] > 10


def test_a_float16_branch_is_stored_in_float16_in_onnx(tiny_digits_dit, tmp_path):
    den = tiny_digits_dit.copy()
    cs = collect(den, num_samples=2, steps=6, policy=TimestepPolicy("uniform", count=2), progress=False)
    report = lowrank_(den, LowRankConfig(rank=4, max_fraction=None, alpha_grid=[0.5], branch_dtype="float16",
                                         **{**W4A4, "act_group_size": 16}), cs, progress=False)
    assert {p.dtype for n, p in den.named_parameters() if ".branch." in n} == {torch.float16}
    res = diffpress.export_onnx(den, tmp_path / "onnx")
    model = onnx.load(tmp_path / "onnx" / "model.onnx")
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == 2 * sum(layer["rank"] > 0 for layer in report.layers)  # down and up of each branch
    assert res.spec["lowrank_branch_fp16_initializers"] == len(halves)
    assert res.verification["passed"] and res.verification["rel_rms_diff"] < 1e-4


def test_the_randomized_svd_matches_the_full_one_on_a_low_rank_plus_noise_weight():
    from diffpress.compress.lowrank import svd_r

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 300, generator=gen, dtype=torch.float64)
    w += 1e-3 * torch.randn(200, 300, generator=gen, dtype=torch.float64)
    full, fast = svd_r(w, 8), svd_r(w, 8, "randomized")
    err_full = float((w - full[0] @ full[1]).norm())
    assert float((w - fast[0] @ fast[1]).norm()) <= 1.01 * err_full
