import pytest
import torch

import diffpress
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, ReconstructConfig, quantize_
from diffpress.compress.quant import ActQuant, QuantConv2d
from diffpress.runtime import RunContext
from diffpress.compress.reconstruct import AdaRound, calibration_batches, find_blocks
from diffpress.errors import DiffpressError


@pytest.fixture(scope="module")
def setup(make_quant_unet):
    den = make_quant_unet()
    cs = collect(den, num_samples=6, steps=8, policy=TimestepPolicy("uniform", count=3), progress=False)
    return den, cs


def _out_err(q, den, cs):
    with torch.no_grad():
        return sum(float((q(x, t, c) - den(x, t, c)).pow(2).sum()) for x, t, c in cs.batches(16))


def test_adaround_starts_at_the_float_weight_and_hardens_to_the_grid():
    w = torch.randn(4, 6)
    scale = w.abs().amax(1, keepdim=True).expand_as(w) / 7
    ar = AdaRound(w, scale, qmax=7)
    assert torch.allclose(ar(), w, atol=1e-4)  # soft weight == float weight at the start
    assert torch.equal(ar.integers(), torch.clamp(torch.round(w / scale), -7, 7).to(torch.int8))  # == nearest
    with torch.no_grad():
        ar.v.fill_(5.0)  # every weight rounds up
    assert torch.equal(ar.integers(), torch.clamp(torch.floor(w / scale) + 1, -7, 7).to(torch.int8))
    assert float(ar.regularizer(2.0).detach()) == pytest.approx(0.0, abs=1e-6)  # h saturated at 1: no penalty


def test_straight_through_fake_quant_passes_gradients_inside_the_range():
    ctx = RunContext()
    aq = ActQuant([0.1], [0], [], bits=8, context=ctx)  # uint8, range [0, 25.5]
    x = torch.tensor([-1.0, 0.33, 30.0], requires_grad=True)
    with ctx.using(mode="straight_through"):
        y = aq(x)
    assert torch.allclose(y.detach(), torch.tensor([0.0, 0.3, 25.5]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_blocks_come_from_module_lists(setup):
    den, _ = setup
    names = ["model.down_blocks.0.resnets.0.conv1", "model.down_blocks.0.resnets.0.conv2",
             "model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "model.down_blocks.1.attentions.0.proj_in", "model.conv_out"]
    blocks = dict(find_blocks(names, den))
    assert blocks == {
        "model.down_blocks.0.resnets.0": names[:2],
        # to_out.0 is a one-layer list element: it joins its transformer block
        "model.down_blocks.1.attentions.0.transformer_blocks.0": names[2:4],
        "model.down_blocks.1.attentions.0": [names[4]],
        "model.conv_out": [names[5]]}
    assert [b for b, _ in find_blocks(names, den, "layer")] == names


def test_calibration_batches_spread_over_every_timestep(setup):
    _, cs = setup
    data = calibration_batches(cs, samples=12, batch_size=8)
    assert {float(t[0]) for _, t, _ in data} == set(cs.timesteps)
    assert all(len(set(t.tolist())) == 1 for _, t, _ in data)  # one timestep per batch
    assert 12 <= sum(len(x) for x, _, _ in data) <= 12 + len(data)


def test_reconstruction_never_loses_to_nearest_and_beats_it_overall(setup):
    den, cs = setup
    near = den.copy()
    quantize_(near, QuantizeConfig(weights="int4"), cs, progress=False)
    rec = den.copy()
    report = quantize_(rec, QuantizeConfig(weights="int4", reconstruct=ReconstructConfig(iters=60, time_budget=None)),
                       cs, progress=False)
    learned = [r for r in report.reconstruction if r["result"] == "adaround"]
    assert learned and all(r["loss_learned"] < r["loss_nearest"] for r in learned)
    assert _out_err(rec, den, cs) < _out_err(near, den, cs)
    changed = 0
    for spec in report.quantized:
        m, n = rec.get_submodule(spec["name"]), near.get_submodule(spec["name"])
        assert m.rounding is None  # the learning state is gone
        for key, buf in m.named_buffers():
            if key.startswith("weight_q"):
                assert buf.dtype == torch.int8 and buf.abs().max() <= 7
                changed += int((buf != n.get_buffer(key)).sum())
                # AdaRound moves a weight by at most one step from its float value
                assert (buf.float() - n.get_buffer(key).float()).abs().max() <= 1
    assert changed > 0
    assert "learned rounding kept in" in report.summary()


def test_time_budget_bounds_the_work(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(reconstruct=ReconstructConfig(iters=10_000, time_budget=0.5)), cs,
                       progress=False)
    assert sum(r.get("seconds", 0) for r in report.reconstruction) < 5
    assert any(r["result"] == "nearest (time budget spent)" for r in report.reconstruction)


def test_bias_correction_removes_the_mean_output_error(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(weights="int4", activations=None, bias_correction=True), cs, progress=False)
    assert report.bias_corrected > 0 and "bias correction" in report.summary()
    plain = den.copy()
    quantize_(plain, QuantizeConfig(weights="int4", activations=None), cs, progress=False)
    # the first quantized layer sees float inputs: its corrected mean error per channel is ~0
    name = next(s["name"] for s in report.quantized if isinstance(q.get_submodule(s["name"]), QuantConv2d)
                and q.get_submodule(s["name"]).bias is not None)
    outs = {}
    for key, model in (("q", q), ("plain", plain), ("fp", den)):
        got = []
        h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.append(o.detach()))
        with torch.no_grad():
            for x, t, c in calibration_batches(cs, 256, 32):
                model(x, t, c)
        h.remove()
        outs[key] = torch.cat(got)
    err_q = (outs["q"] - outs["fp"]).mean((0, 2, 3)).abs().max()
    err_plain = (outs["plain"] - outs["fp"]).mean((0, 2, 3)).abs().max()
    assert err_plain > 1e-4 and err_q < 1e-5


def test_reconstructed_model_saves_and_reloads_exactly(setup, tmp_path):
    den, cs = setup
    q = den.copy()
    quantize_(q, QuantizeConfig(weights="int4", reconstruct={"iters": 5, "time_budget": None},
                                bias_correction=True), cs, progress=False)
    q.save_pretrained(tmp_path / "q")
    r = diffpress.load(tmp_path / "q")
    x, t, c = cs.x[:4], cs.t[:4], cs.cond[:4]
    assert torch.equal(q(x, t, c), r(x, t, c))
    assert r.compression[0]["config"]["reconstruct"]["iters"] == 5


def test_reconstruction_config_errors(setup):
    den, _ = setup
    with pytest.raises(DiffpressError, match="need a calibration set"):
        quantize_(den.copy(), QuantizeConfig(activations=None, reconstruct=ReconstructConfig()))
    with pytest.raises(DiffpressError, match="granularity.*allowed: block, layer"):
        ReconstructConfig(granularity="model")
    with pytest.raises(DiffpressError, match="iters: must be >= 1"):
        QuantizeConfig(reconstruct={"iters": 0})


def _weight_ints(model, names):
    return {f"{n}.{k}": b.clone() for n in names for k, b in model.get_submodule(n).named_buffers()
            if k.startswith("weight_q")}


def test_a_block_whose_learned_rounding_is_worse_keeps_nearest_exactly(setup):
    den, cs = setup
    near = den.copy()
    report_near = quantize_(near, QuantizeConfig(weights="int4"), cs, progress=False)
    names = [s["name"] for s in report_near.quantized]
    q = den.copy()
    # a huge step size throws every rounding variable far up or down: random rounding, worse than nearest
    report = quantize_(q, QuantizeConfig(weights="int4", reconstruct=ReconstructConfig(
        iters=3, lr=1e3, warmup=0.0, time_budget=None)), cs, progress=False)
    reverted = [r for r in report.reconstruction if r["result"] == "nearest (learned rounding was not better)"]
    assert reverted and all(r["loss_learned"] > r["loss_nearest"] for r in reverted)
    got, want = _weight_ints(q, names), _weight_ints(near, names)
    blocks = dict(find_blocks(names, q))
    for r in reverted:
        for layer in blocks[r["block"]]:
            for key in [k for k in want if k.startswith(layer + ".weight_q")]:
                assert torch.equal(got[key], want[key])


def test_an_interrupted_reconstruction_leaves_a_clean_nearest_model(setup, monkeypatch):
    den, cs = setup
    near = den.copy()
    names = [s["name"] for s in quantize_(near, QuantizeConfig(weights="int4"), cs, progress=False).quantized]
    calls = []

    def interrupt(self, beta):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return AdaRound.__dict__["_reg"](self, beta)

    monkeypatch.setattr(AdaRound, "_reg", AdaRound.regularizer, raising=False)
    monkeypatch.setattr(AdaRound, "regularizer", interrupt)
    q = den.copy()
    with pytest.raises(KeyboardInterrupt):
        quantize_(q, QuantizeConfig(weights="int4", reconstruct=ReconstructConfig(iters=20, warmup=0.0,
                                                                                   time_budget=None)), cs,
                  progress=False)
    assert all(getattr(m, "rounding", None) is None for m in q.modules())
    assert not any("rounding" in k for k in q.state_dict())
    # the block that was being learned went back to round-to-nearest (earlier blocks may keep what they learned)
    first_block_layers = find_blocks(names, q)[0][1]
    got, want = _weight_ints(q, first_block_layers), _weight_ints(near, first_block_layers)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_group_wise_int4_with_timestep_groups_reconstructs(setup):
    den, cs = setup
    q = den.copy()
    report = quantize_(q, QuantizeConfig(weights="int4", group_size=16, timestep_groups=2, bias_correction=True,
                                         reconstruct=ReconstructConfig(iters=10, time_budget=None)), cs, progress=False)
    assert any(r["result"] == "adaround" for r in report.reconstruction)
    for spec in report.quantized:
        for key, buf in q.get_submodule(spec["name"]).named_buffers():
            if key.startswith("weight_q"):
                assert buf.abs().max() <= 7
    x, t, c = cs.x[:4], cs.t[:4], cs.cond[:4]
    rel = float(((q(x, t, c) - den(x, t, c)).pow(2).mean() / den(x, t, c).pow(2).mean()).detach())
    assert rel < 0.1
