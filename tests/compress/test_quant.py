import pytest
import torch
from torch import nn

from diffpress.calibration.observers import StepStats
from diffpress.compress.quant import (ActQuant, QuantConv2d, QuantLinear, act_qparams,
                                      aggregate_range, dequantize_weight, quantize_weight, timestep_groups)
from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext


def test_int8_per_channel_weight_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.03, 0.01, -0.04]])
    q, s = quantize_weight(w, 8)
    assert s.shape == (2,) and s.tolist() == pytest.approx([1.0 / 127, 0.04 / 127])
    assert q.tolist() == [[64, -127, 32], [95, 32, -127]]  # round(63.5)=64, round(31.75)=32, round(95.25)=95
    assert q.dtype == torch.int8
    assert torch.allclose(dequantize_weight(q, s, None), w, atol=0.5 / 127)


def test_int4_group_weight_by_hand():
    w = torch.tensor([[0.7, -0.35, 7.0, 1.0]])
    q, s = quantize_weight(w, 4, group_size=2)
    assert s.shape == (1, 2) and s.flatten().tolist() == pytest.approx([0.1, 1.0])
    assert q.tolist() == [[7, -4, 7, 1]]  # -3.5 rounds half to even -> -4
    assert q.abs().max() <= 7
    with pytest.raises(DiffpressError, match="does not divide"):
        quantize_weight(torch.zeros(2, 6), 4, group_size=4)


def test_act_qparams_unsigned_and_symmetric():
    scale, zp = act_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64
    scale, zp = act_qparams(0.5, 2.0)  # range is widened to hold zero
    assert scale == pytest.approx(2 / 255) and zp == 0
    scale, zp = act_qparams(-2.0, 1.0, symmetric=True)
    assert scale == pytest.approx(2 / 127) and zp == 0
    aq = ActQuant([scale], [0], [], symmetric=True)
    assert aq(torch.tensor([-2.0, -3.0, 10 * scale])).tolist() == pytest.approx([-2.0, -128 * scale, 10 * scale])  # int8 saturation


def _stats(values: torch.Tensor) -> StepStats:
    s = StepStats()
    s.update(values, max_samples=100_000, gen=torch.Generator().manual_seed(0))
    return s


def test_range_rules():
    g = torch.Generator().manual_seed(0)
    body = torch.randn(20_000, generator=g)
    with_outlier = torch.cat([body, torch.tensor([40.0])])
    steps = [_stats(with_outlier), _stats(body * 0.5)]
    lo, hi = aggregate_range(steps, "max")
    assert hi == 40.0 and lo == pytest.approx(float(body.min()))
    lo_p, hi_p = aggregate_range(steps, "percentile", percentile=99.9)
    assert hi_p < 5 and lo_p > -5  # the single outlier is clipped
    lo_m, hi_m = aggregate_range(steps, "mse")
    assert hi_m < 40.0  # clipping the outlier lowers the MSE on the bulk
    with pytest.raises(DiffpressError, match="allowed"):
        aggregate_range(steps, "entropy")


def test_timestep_groups_and_runtime_selection():
    assert timestep_groups([900.0, 600.0, 300.0, 0.0], 2) == [[0.0, 300.0], [600.0, 900.0]]
    ctx = RunContext()
    aq = ActQuant([0.1, 1.0], [0, 0], [450.0], context=ctx)
    x = torch.tensor([0.26, 2.6])
    ctx.t = torch.tensor([100.0])
    assert aq(x).tolist() == pytest.approx([0.3, 2.6])  # group 0, scale 0.1
    ctx.t = torch.tensor([800.0, 800.0])
    assert aq(x).tolist() == pytest.approx([0.0, 3.0])  # group 1, scale 1.0
    ctx.t = None
    with pytest.raises(DiffpressError, match="timestep"):
        aq(x)


def test_quant_linear_matches_manual_fake_quant():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    ql = QuantLinear(lin, 8, None, ActQuant([0.02], [128], []), ActQuant([0.05], [100], []))
    x = torch.randn(3, 8)
    q, s = quantize_weight(lin.weight, 8)
    xq = (torch.clamp(torch.round(x / 0.02) + 128, 0, 255) - 128) * 0.02
    y = xq @ (q.float() * s[:, None]).T
    yq = (torch.clamp(torch.round(y / 0.05) + 100, 0, 255) - 100) * 0.05
    assert torch.allclose(ql(x), yq + lin.bias, atol=1e-6)  # bias added after the output quantizer


def test_split_conv_is_exact_in_float_and_quantizes_parts_separately():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.cat([torch.randn(2, 4, 5, 5), 50 * torch.randn(2, 2, 5, 5)], 1)
    split = QuantConv2d(conv, 8, None, None, split=4)
    # two partial convolutions == one convolution over the concat (each part has its own weight scales)
    joined = nn.functional.conv2d(x, torch.cat([split.weight(0), split.weight(1)], 1), conv.bias, padding=1)
    assert torch.allclose(split(x), joined, atol=1e-4)
    # with activation quantizers each part has its own scale: the small-valued part keeps its resolution
    a_small, a_big, a_whole = ActQuant([10 / 255], [128], []), ActQuant([200 / 255], [128], []), ActQuant([200 / 255], [128], [])
    split_q = QuantConv2d(conv, 8, None, [a_small, a_big], None, split=4)
    xa = x[:, :4]
    assert (a_small(xa) - xa).pow(2).mean() < (a_whole(x)[:, :4] - xa).pow(2).mean() / 100
    expected = (nn.functional.conv2d(a_small(xa), split.weight(0), conv.bias, padding=1)
                + nn.functional.conv2d(a_big(x[:, 4:]), split.weight(1), None, padding=1))
    assert torch.allclose(split_q(x), expected, atol=1e-5)
