import os
import stat

import pytest
import torch
from torch import nn
import diffpress
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.compress.quant import ActQuant, QuantConv2d, QuantLinear


@pytest.fixture(scope="module")
def setup(make_quant_unet):
    den = make_quant_unet()
    cs = collect(den, num_samples=6, steps=8, policy=TimestepPolicy("uniform", count=4), progress=False)
    return den, cs


def _rel_err(a, b):
    return float(((a - b).pow(2).mean() / b.pow(2).mean()).detach())


def test_w8a8_replaces_layers_reports_skips_and_stays_close(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(), cs, progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["model.conv_in"] == "role first (skip_roles)"
    assert reasons["model.conv_out"] == "role last (skip_roles)"
    assert reasons["model.time_embedding.linear_1"].startswith("role time_embedding")
    assert any("activation-activation" in r for r in reasons.values())
    for spec in report.quantized:
        mod = q.get_submodule(spec["name"])
        assert isinstance(mod, (QuantLinear, QuantConv2d))
    splits = {s["name"]: s["split"] for s in report.quantized if s["split"] is not None}
    assert splits == {"model.up_blocks.0.resnets.0.conv1": 32, "model.up_blocks.0.resnets.0.conv_shortcut": 32,
                      "model.up_blocks.0.resnets.1.conv1": 32, "model.up_blocks.0.resnets.1.conv_shortcut": 32,
                      "model.up_blocks.1.resnets.0.conv1": 32, "model.up_blocks.1.resnets.0.conv_shortcut": 32,
                      "model.up_blocks.1.resnets.1.conv1": 16, "model.up_blocks.1.resnets.1.conv_shortcut": 16}
    x, t, c = cs.x[:4], cs.t[:4], cs.cond[:4]
    assert _rel_err(q(x, t, c), den(x, t, c)) < 0.01
    assert q.compression[0]["pass"] == "quantize"


def test_timestep_groups_follow_t(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(timestep_groups=2), cs, progress=False)
    aq = next(m for m in q.modules() if isinstance(m, ActQuant))
    assert aq.groups == 2 and len(aq.bounds) == 1
    ts = sorted(cs.timesteps)
    assert ts[1] < float(aq.bounds[0]) < ts[2]  # between the two halves of the calibrated timesteps
    q(cs.x[:2], torch.tensor([ts[0]] * 2), cs.cond[:2])
    assert int(aq.group_index()) == 0
    q(cs.x[:2], torch.tensor([ts[-1]] * 2), cs.cond[:2])
    assert int(aq.group_index()) == 1
    assert all(s["act_groups"] == 2 for s in report.quantized)


def test_save_and_reload_reproduce_outputs_exactly(setup, tmp_path):
    den, cs = setup
    q = den.copy()
    quantize_(q, QuantizeConfig(weights="int4", group_size=16, timestep_groups=3), cs, progress=False)
    q.save_pretrained(tmp_path / "q")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "q" / "compressed.safetensors").stat().st_mode) == 0o666 & ~mask
    r = diffpress.load(tmp_path / "q")
    for i in (0, len(cs) - 4):
        x, t, c = cs.x[i:i + 4], cs.t[i:i + 4], cs.cond[i:i + 4]
        assert torch.equal(q(x, t, c), r(x, t, c))
    sd = r.state_dict()
    qkeys = [k for k in sd if k.endswith("weight_q") or k.endswith("weight_q0")]
    assert qkeys and all(sd[k].dtype == torch.int8 and sd[k].abs().max() <= 7 for k in qkeys)


def test_int4_is_coarser_than_int8(setup):
    den, cs = setup
    x, t, c = cs.x[:4], cs.t[:4], cs.cond[:4]
    errs = {}
    for w in ("int8", "int4"):
        q = den.copy()
        quantize_(q, QuantizeConfig(weights=w, activations=None), progress=False)
        errs[w] = _rel_err(q(x, t, c), den(x, t, c))
    assert 0 < errs["int8"] < errs["int4"]


def test_skip_patterns_group_size_and_config_errors(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(skip=["*attn2*"], group_size=24, activations=None), progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"] == "matches skip pattern '*attn2*'"
    assert any("does not divide" in r for r in reasons.values())
    with pytest.raises(diffpress.DiffpressError, match="act_rule: 'entropy' is not allowed; allowed: max, percentile, mse"):
        QuantizeConfig(act_rule="entropy")
    with pytest.raises(diffpress.DiffpressError, match="skip_roles"):
        QuantizeConfig(skip_roles=["decoder"])
    with pytest.raises(diffpress.DiffpressError, match="calibration set"):
        quantize_(den.copy(), QuantizeConfig(), None)


def test_role_skipped_layers_can_keep_int8_weights(setup, tmp_path):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(skip_roles_weights="int8", skip=["model.time_embedding.linear_2"]),
                       cs, progress=False)
    weight_only = {s["name"] for s in report.quantized if s.get("weight_only")}
    assert "model.time_embedding.linear_1" in weight_only and "model.conv_in" in weight_only
    assert "model.time_embedding.linear_2" not in weight_only  # an explicit skip pattern keeps it float
    mod = q.get_submodule("model.time_embedding.linear_1")
    assert isinstance(mod, QuantLinear) and mod.act_in is None and mod.act_out is None
    x, t, c = cs.x[:4], cs.t[:4], cs.cond[:4]
    assert _rel_err(q(x, t, c), den(x, t, c)) < 0.02
    q.save_pretrained(tmp_path / "q")
    assert torch.equal(diffpress.load(tmp_path / "q")(x, t, c), q(x, t, c))


def test_target_any_keeps_w8a8_weights_on_7_bits(tmp_path):
    """Target any (the default): |q| <= 63, so ONNX Runtime's u8 x s8 pair sums fit int16 on AVX2 CPUs without
    VNNI; weight-only layers (no integer kernel) and target vnni keep the full int8 range."""
    import diffpress

    den = diffpress.load("digits-dit")
    cs = diffpress.calibrate(den, num_samples=4, steps=10, progress=False)
    bits = {}
    for name, config in {"any": QuantizeConfig(), "vnni": QuantizeConfig(target="vnni"),
                         "weight-only": QuantizeConfig(activations=None)}.items():
        q = den.copy()
        report = diffpress.quantize_(q, config, cs, progress=False)
        ints = [b for n, b in q.named_buffers() if n.rsplit(".", 1)[-1].startswith("weight_q")]
        bits[name] = ({s["weight_bits"] for s in report.quantized}, max(int(b.abs().max()) for b in ints))
        if name == "any":
            x, t, c = den.example_inputs(2, seed=1)
            with torch.no_grad():
                ref, out = den(x, t, c), q(x, t, c)
            assert float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 0.05
            q.save_pretrained(tmp_path / "m")
            with torch.no_grad():
                assert torch.equal(diffpress.load(tmp_path / "m")(x, t, c), out)
    assert bits == {"any": ({7}, 63), "vnni": ({8}, 127), "weight-only": ({8}, 127)}


def test_same_padding_convs_are_quantized_and_transposed_convs_reported():
    """``nn.Conv2d(padding="same")`` (aten.conv2d.padding) is a compute layer like any other; a ConvTranspose2d
    is left in float with the true reason (no transposed-convolution quantizer), not as an activation product."""
    import diffpress
    from diffpress import Denoiser
    from diffpress.graph import capture

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 8, 3, padding="same")
            self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
            self.b = nn.Conv2d(8, 8, 5, padding="same", dilation=2)
            self.c = nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x, t, cond):
            h = torch.relu(self.a(x))
            h = self.up(h)[:, :, ::2, ::2]
            return self.c(torch.relu(self.b(h)))

    den = Denoiser(Net().eval(), sample_shape=(2, 8, 8))
    layers = {layer.name: layer for layer in capture(den, batch=2).layers}
    assert layers["model.a"].op == "conv2d" and layers["model.a"].macs == 2 * 8 * 64 * 2 * 9
    assert "first" in layers["model.a"].roles
    q = den.copy()
    report = diffpress.quantize_(q, QuantizeConfig(activations=None, skip_roles=[]), progress=False)
    assert {s["name"] for s in report.quantized} == {"model.a", "model.b", "model.c"}
    assert report.skipped == [{"name": "model.up", "reason": "conv_transpose2d (ConvTranspose2d): this pass rewrites "
                                                            "linear, conv2d layers only, not conv_transpose2d"}]
    x, t, _ = den.example_inputs(2)
    with torch.no_grad():
        ref, out = den(x, t), q(x, t)
    assert float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 0.02
