import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffpress import Denoiser, DiffpressError
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.exporters import export_onnx, export_torchscript
from diffpress.exporters.onnx import example_feed
from diffpress.zoo.models import training_scheduler


@pytest.mark.parametrize("side", [8, 16])
def test_float_export_matches_pytorch_at_two_shapes_and_batches(side, tmp_path, make_quant_unet):
    den = make_quant_unet(side)
    res = export_onnx(den, tmp_path / "m")
    checks = res.verification["checks"]
    assert [c["batch"] for c in checks if c["graph"] == "model"] == [2, 3]  # dynamic batch
    assert all(c["rel_rms_diff"] < 1e-5 for c in checks)
    assert [g["name"] for g in res.spec["graphs"]] == ["model", "conditioner"]  # labels -> states, for deploy
    assert "QuantizeLinear" not in res.op_types and res.op_types.get("Conv", 0) > 0
    spec = json.loads((tmp_path / "m" / "io_spec.json").read_text())
    assert [i["name"] for i in spec["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert spec["inputs"][0]["shape"] == ["batch", 1, side, side] and spec["inputs"][1]["dtype"] == "float32"
    onnx.checker.check_model(str(tmp_path / "m" / "model.onnx"), full_check=True)


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory, make_quant_unet):
    den = make_quant_unet(8)
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    q = den.copy()
    quantize_(q, QuantizeConfig(timestep_groups=2), cs, progress=False)
    out = tmp_path_factory.mktemp("w8a8") / "m"
    return q, export_onnx(q, out), out


def test_w8a8_export_has_qdq_and_runs_on_integer_kernels(w8a8):
    q, res, out = w8a8
    assert res.op_types["QuantizeLinear"] > 0 and res.op_types["DequantizeLinear"] > 0
    assert res.op_types.get("Gather", 0) > 0  # timestep-group scales gathered in the graph
    # ONNX Runtime fused the Q/DQ around convolutions and matmuls into integer kernels
    assert res.ort_op_types.get("com.microsoft::QLinearConv", 0) + res.ort_op_types.get("QLinearConv", 0) >= 10
    assert res.ort_op_types.get("QLinearMatMul", 0) > 0
    assert res.verification["passed"]
    model = onnx.load(str(out / "model.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) >= 20  # weights are stored as int8
    assert not any(n.metadata_props for n in model.graph.node)  # exporter debug metadata stripped


def test_int4_linear_weights_become_int4_and_matmulnbits(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    den = Denoiser(dit.eval(), scheduler_config=training_scheduler())
    quantize_(den, QuantizeConfig(weights="int4", group_size=32, activations=None), progress=False)
    res = export_onnx(den, tmp_path / "m")
    assert res.spec["int4_initializers"] > 0
    assert res.ort_op_types.get("com.microsoft::MatMulNBits", 0) > 0
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    assert res.verification["checks"][0]["rel_rms_diff"] < 1e-3  # weight-only: the same arithmetic


def test_torchscript_round_trip_in_a_fresh_process(w8a8, tmp_path):
    q, _, _ = w8a8
    with pytest.warns(FutureWarning, match="deprecated"):
        spec = export_torchscript(q, tmp_path / "ts")
    assert spec["verification"]["passed"]
    args = example_feed(q, 2, None, seed=7)
    with torch.no_grad():
        ref = q(*args)
    torch.save({"args": args, "ref": ref}, tmp_path / "io.pt")
    code = (
        "import torch, sys, warnings; warnings.simplefilter('ignore');"
        f"d = torch.load(r'{tmp_path / 'io.pt'}', weights_only=True);"
        f"m = torch.jit.load(r'{tmp_path / 'ts' / 'model.pt'}');"
        "out = m(*d['args']); print(float((out - d['ref']).abs().max()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(run.stdout.strip()) < 1e-5


def test_tensorrt_style_export_symmetric_int8_constant_scales_at_opset_18(tmp_path, make_quant_unet):
    """What TensorRT wants: signed int8 activations with zero point 0, constant Q/DQ scales, an older opset."""
    den = make_quant_unet(8)
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    quantize_(den, QuantizeConfig(symmetric_activations=True), cs, progress=False)
    res = export_onnx(den, tmp_path / "m", opset=18)
    assert res.verification["passed"]
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    inits = {t.name: t for t in model.graph.initializer}
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qnodes) > 20
    for n in qnodes:
        scale, zp = inits[n.input[1]], inits[n.input[2]]  # constants, not computed in the graph
        assert zp.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zp).any()
        assert onnx.numpy_helper.to_array(scale).size == 1
    with pytest.raises(Exception, match="int4 weights need opset >= 21"):
        q4 = make_quant_unet(8)
        quantize_(q4, QuantizeConfig(weights="int4", group_size=16, activations=None), progress=False)
        export_onnx(q4, tmp_path / "m4", opset=18)


@pytest.mark.parametrize("group_size", [None, 16])
def test_int4_weights_are_int4_initializers_in_onnx_and_packed_on_disk(group_size, tmp_path, make_quant_unet):
    """Per-channel and grouped int4 weights: INT4 initializers in the ONNX file, two values per byte in
    compressed.safetensors, and a bit-exact reload."""
    from safetensors import safe_open

    import diffpress

    den = make_quant_unet(8)
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    q = den.copy()
    report = quantize_(q, QuantizeConfig(weights="int4", group_size=group_size), cs, progress=False)
    weights = {f"{s['name']}.weight_q" + ("" if s["kind"] == "linear" else str(i))
               for s in report.quantized for i in range(1 if s["split"] is None else 2)}
    res = export_onnx(q, tmp_path / "m")
    assert res.verification["passed"]
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    int4 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int4) == len(weights) == res.spec["int4_initializers"] and not int8
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
    blocked = [any(a.name == "block_size" for a in n.attribute) for n in dq]
    assert len(dq) == len(int4) and all(blocked) == (group_size is not None) and any(blocked) == (group_size is not None)
    assert all(len(n.input) == 2 for n in dq)  # symmetric: no zero point
    q.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "compressed.safetensors"), framework="pt") as f:
        packed = json.loads(f.metadata()["packed"])
        assert set(packed) == weights
        for key in weights:
            stored, shape = f.get_tensor(key), packed[key]["shape"]
            assert stored.dtype == torch.uint8 and stored.numel() == (torch.Size(shape).numel() + 1) // 2
    back = diffpress.load(tmp_path / "saved")
    for key in weights:
        assert torch.equal(back.state_dict()[key], q.state_dict()[key])
    x, t, c = example_feed(q, 2, None, seed=3)
    with torch.no_grad():
        assert torch.equal(back(x, t, c), q(x, t, c))


def test_int4_weights_can_export_as_int8_initializers_for_the_integer_kernels(tmp_path, make_quant_unet):
    den = make_quant_unet(8)
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    quantize_(den, QuantizeConfig(weights="int4", int4_export="int8"), cs, progress=False)
    res = export_onnx(den, tmp_path / "m")
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    assert res.spec["int4_initializers"] == 0 and not any(t.data_type == onnx.TensorProto.INT4
                                                          for t in model.graph.initializer)
    assert res.ort_op_types.get("com.microsoft::QLinearConv", 0) + res.ort_op_types.get("QLinearConv", 0) >= 10
    assert res.verification["passed"]


def test_onnx_runtime_failures_are_diffpress_errors(tmp_path):
    from diffpress.exporters.onnx import ort_session

    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(DiffpressError, match=r"ONNX Runtime .* cannot load broken.onnx: .*try another opset"):
        ort_session(tmp_path / "broken.onnx")


def test_a_no_op_squeeze_is_dropped_so_onnx_runtime_loads_the_graph(tmp_path):
    """torch.squeeze on an axis that is not 1 is a no-op; exported as ONNX Squeeze it fails at load time."""
    class Squeezy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x, t, cond):
            h = self.conv(x).flatten(2)         # (B, 2, 64)
            return (h.squeeze(1) + t.float()[:, None, None] * 0).reshape(x.shape)  # squeeze(1) on size 2: no-op

    den = Denoiser(Squeezy().eval(), sample_shape=(2, 8, 8))
    res = export_onnx(den, tmp_path / "sq")
    assert res.verification["passed"] and "Squeeze" not in res.op_types and res.op_types.get("Identity")


def test_export_names_its_cpu_target_and_refuses_one_the_weights_do_not_suit(tmp_path):
    import diffpress

    den = diffpress.load("digits-dit")
    cs = collect(den, num_samples=2, steps=4, policy=TimestepPolicy("uniform", count=2), progress=False)
    q = den.copy()
    quantize_(q, QuantizeConfig(target="vnni"), cs, progress=False)
    with pytest.raises(DiffpressError, match="quantized for target 'vnni', which does not run correctly on 'any'"):
        export_onnx(q, tmp_path / "any", target="any")
    assert not (tmp_path / "any").exists()
    res = export_onnx(q, tmp_path / "vnni", target="vnni", verify=False)
    assert res.spec["target"]["name"] == "vnni" and res.spec["target"]["weight_bits"] == [8]
    assert "AVX2" in res.spec["target"]["cpus"]
    assert export_onnx(den, tmp_path / "fp32", target="any").spec["target"] is None  # a float model: any CPU


def test_a_tiny_epsilon_survives_export(tmp_path):
    """The exporter's optimizer drops ``x + c`` for |c| < 1e-8 as a no-op; Sana's linear attention divides by
    ``den + 1e-15``, so without the epsilon ONNX Runtime returns NaN (0 / 0) where PyTorch returns 0."""
    class Ratio(torch.nn.Module):
        def forward(self, x, t, cond):
            gate = torch.relu(x)
            return gate / (gate.sum(1, keepdim=True) + 1e-15) + t.float()[:, None, None, None] * 0

    den = Denoiser(Ratio(), sample_shape=(2, 4, 4))
    res = export_onnx(den, tmp_path / "eps")  # verified in ORT at two batch sizes: NaN would fail it
    assert res.verification["passed"] and res.op_types.get("Add")
    x = -torch.ones(1, 2, 4, 4)  # every gate 0: 0 / (0 + 1e-15) = 0
    from diffpress.exporters.onnx import ort_session

    sess = ort_session(tmp_path / "eps" / "model.onnx")
    out = sess.run(None, {"sample": x.numpy(), "timestep": np.array([10.0], dtype=np.float32)})[0]
    assert np.isfinite(out).all() and not out.any()
