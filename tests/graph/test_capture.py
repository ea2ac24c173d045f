"""capture(): torch.export of a Denoiser into an fx GraphModule; layers, names and MACs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffpress import Denoiser, DiffpressError
from diffpress.graph import capture

KINDS = ("unet2d", "unet2d_condition", "dit", "pixart", "module")


@pytest.fixture(scope="module")
def captured(tiny, cond_for, sizes):
    """``captured(kind)``: (denoiser, inputs, graph), captured once per module at batch 2."""
    cache = {}

    def get(kind):
        if kind not in cache:
            den = tiny(kind)
            x = torch.randn(2, sizes.channels, 8, 8, generator=torch.Generator().manual_seed(0))
            inputs = (x, torch.tensor([300, 300]), cond_for(den, 2, tokens=4))
            cache[kind] = (den, inputs, capture(den, inputs))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_graph_computes_the_denoiser(kind, captured):
    den, inputs, graph = captured(kind)
    assert isinstance(graph.gm, torch.fx.GraphModule)
    assert graph.batch == 2 and graph.example_inputs[0] is inputs[0]
    with torch.no_grad():
        expected = den(*inputs)
        got = graph.gm(*inputs)
    assert got.shape == expected.shape == inputs[0].shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_layers_are_the_conv_and_linear_modules(kind, captured):
    """Every Conv2d / Linear the model holds is a layer named by its qualified name, with exact MACs."""
    den, _, graph = captured(kind)
    modules = dict(den.named_modules())
    convs_and_linears = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    layer_names = {layer.name for layer in graph.layers if layer.op in ("conv2d", "linear")}
    assert layer_names == convs_and_linears
    for layer in graph.layers:
        assert layer.name in modules
        assert layer.module_type == type(modules[layer.name]).__name__
        module = modules[layer.name]
        if layer.op == "linear":
            assert layer.shape[-1] == module.out_features
            assert layer.macs == math.prod(layer.shape) * module.in_features
        elif layer.op == "conv2d":
            assert layer.shape[:2] == (2, module.out_channels)
            kh, kw = module.kernel_size
            assert layer.macs == math.prod(layer.shape) * module.in_channels // module.groups * kh * kw
    assert graph.macs == sum(layer.macs for layer in graph.layers) > 0


def test_unet_layer_order_and_attention(captured, sizes):
    den, _, graph = captured("unet2d")
    assert graph.layers[0].name == "model.time_embedding.linear_1" and graph.layers[0].shape == (2, 32)
    assert [layer.name for layer in graph.layers if layer.op in ("conv2d", "linear")][-1] == "model.conv_out"
    assert graph.layers[-1].shape == (2, sizes.channels, 8, 8)
    attention = [layer for layer in graph.layers if layer.op == "attention"]
    assert [layer.name for layer in attention] == [
        "model.down_blocks.1.attentions.0", "model.mid_block.attentions.0",
        "model.up_blocks.0.attentions.0", "model.up_blocks.0.attentions.1"]
    # self-attention over the 4x4 tokens of the low level, 16 channels (2 heads of 8): heads * L * S * (D + Dv)
    assert all(layer.macs == 2 * 2 * 16 * 16 * (8 + 8) for layer in attention)


# -- MACs of a hand-built module -------------------------------------------------------------------
class Hand(nn.Module):
    """Conv2d, Linear, scaled-dot-product attention and matmul, with shapes chosen for hand counting."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1))

    def forward(self, x, t, cond=None):
        h = self.conv(x)                                    # (B, 4, 4, 4)
        tokens = h.flatten(2).transpose(1, 2)               # (B, 16, 4)
        q = self.proj(tokens)                               # (B, 16, 6)
        q = q.reshape(q.shape[0], 16, 2, 3).transpose(1, 2)  # (B, 2 heads, 16, 3)
        a = F.scaled_dot_product_attention(q, q, q)         # (B, 2, 16, 3)
        scores = torch.matmul(a, a.transpose(-1, -2))       # (B, 2, 16, 16)
        return self.block(x) + scores.mean()


B = 2
HAND_MACS = [
    ("model.conv", "conv2d", "Conv2d", B * 4 * 4 * 4 * (3 * 3 * 3)),  # out elements x (Cin * kh * kw) = 3456
    ("model.proj", "linear", "Linear", B * 16 * 6 * 4),               # out elements x in_features = 768
    ("model", "attention", "Hand", B * 2 * 16 * 16 * (3 + 3)),       # QK^T + PV: heads * L * S * (D + Dv) = 6144
    ("model", "matmul", "Hand", B * 2 * 16 * 16 * 3),                 # out elements x inner dim = 3072
    ("model.block.0", "conv2d", "Conv2d", B * 3 * 4 * 4 * 3),         # 1x1 conv = 288
]


def test_hand_counted_macs_and_names():
    den = Denoiser(Hand(), sample_shape=(3, 4, 4))
    graph = capture(den, batch=B)
    got = [(layer.name, layer.op, layer.module_type, layer.macs) for layer in graph.layers]
    assert got == [(name, op, mtype, macs) for name, op, mtype, macs in HAND_MACS]
    assert graph.macs == 3456 + 768 + 6144 + 3072 + 288 == 13728
    assert [layer.shape for layer in graph.layers] == [(2, 4, 4, 4), (2, 16, 6), (2, 2, 16, 3), (2, 2, 16, 16),
                                                      (2, 3, 4, 4)]
    assert capture(den, batch=1).macs * 2 == graph.macs
    assert graph.example_inputs[0].shape == (2, 3, 4, 4)


class MoreOps(nn.Module):
    """Grouped conv, transposed conv, addmm, bmm and a batched einsum."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(6, 2, 2, stride=2)
        self.w = nn.Parameter(torch.randn(3, 5))
        self.b = nn.Parameter(torch.randn(5))
        self.bw = nn.Parameter(torch.randn(2, 7, 4))

    def forward(self, x, t, cond=None):
        h = self.grouped(x)                       # (B, 6, 4, 4)
        u = self.up(h)                            # (B, 2, 8, 8)
        a = torch.addmm(self.b, u.flatten(1)[:, :3], self.w)   # (B, 5), inner 3
        q = u.flatten(2)[:, :, :7]                # (B, 2, 7)
        m = torch.bmm(q, self.bw)                 # (B, 2, 4), inner 7
        e = torch.einsum("bij,bjk->bik", q, self.bw)
        return x + a.sum() + m.sum() + e.sum()


def test_more_ops_macs():
    graph = capture(Denoiser(MoreOps(), sample_shape=(4, 4, 4)), batch=2)
    got = [(layer.name, layer.op, layer.macs) for layer in graph.layers]
    assert got == [
        ("model.grouped", "conv2d", 2 * 6 * 4 * 4 * (4 // 2) * 3 * 3),     # 3456
        ("model.up", "conv_transpose2d", 2 * 6 * 4 * 4 * 2 * 2 * 2),      # input elements x Cout * kh * kw = 1536
        ("model", "matmul", 2 * 5 * 3),                                   # addmm: 30
        ("model", "matmul", 2 * 2 * 4 * 7),                               # bmm: 112
        ("model", "einsum", 2 * 2 * 7 * 4),                               # b * i * j * k = 112
    ]


class EllipsisEinsum(nn.Module):
    def forward(self, x, t, cond=None):
        a = x.flatten(2)                               # (B, 3, 16)
        e = torch.einsum("...ij,...jk->...ik", a, a.transpose(-1, -2))  # (B, 3, 3), inner 16
        return x + e.sum()


def test_einsum_with_ellipsis_counts_the_batch():
    graph = capture(Denoiser(EllipsisEinsum(), sample_shape=(3, 4, 4)), batch=2)
    (layer,) = graph.layers
    assert layer.op == "einsum" and layer.macs == 2 * 3 * 16 * 3


# -- failures --------------------------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return self.conv(x)
        return -x


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.gate = Branchy()

    def forward(self, x, t, cond=None):
        return self.gate(self.pre(x))


def test_data_dependent_branch_names_the_submodule():
    den = Denoiser(WithBranchy(), sample_shape=(3, 4, 4))
    den.train()
    with pytest.raises(DiffpressError) as info:
        capture(den)
    msg = str(info.value)
    assert "torch.export could not capture the model" in msg
    assert "failed inside module 'model.gate'" in msg
    assert "data-dependent" in msg
    # the capture leaves no hooks behind and restores the training flag
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in den.modules())
    assert den.training
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert den(x, 1).shape == (1, 3, 4, 4)
