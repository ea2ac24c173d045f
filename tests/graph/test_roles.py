import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from diffpress import Denoiser
from diffpress.graph import capture


def _roles(den):
    return {layer.name: set(layer.roles) for layer in capture(den, batch=2).layers}


def test_unet_roles_and_skip_concats_from_the_graph(make_quant_unet):
    graph = capture(make_quant_unet(), batch=2)
    roles = {layer.name: set(layer.roles) for layer in graph.layers}
    attn = "model.down_blocks.1.attentions.0.transformer_blocks.0"
    assert roles["model.conv_in"] == {"first"} and roles["model.conv_out"] == {"last"}
    assert roles["model.time_embedding.linear_1"] == {"time_embedding"}
    assert roles["model.down_blocks.0.resnets.0.time_emb_proj"] == {"time_embedding"}
    assert roles[f"{attn}.attn1.to_q"] == {"attn_q"} and roles[f"{attn}.attn1.to_out.0"] == {"attn_out"}
    assert roles[f"{attn}.attn2.to_k"] == {"attn_k", "cond_projection"}  # reads the text states only
    assert roles[f"{attn}.attn2.to_v"] == {"attn_v", "cond_projection"}
    assert roles["model.down_blocks.1.resnets.0.conv_shortcut"] == {"shortcut"}
    assert roles[f"{attn}.ff.net.2"] == {"body"}
    splits = {layer.name: layer.concat_split for layer in graph.layers if layer.concat_split}
    # decoder resnets read cat(hidden, skip): conv1 (through GroupNorm + SiLU) and conv_shortcut
    assert splits["model.up_blocks.0.resnets.0.conv1"] == 32
    assert splits["model.up_blocks.0.resnets.0.conv_shortcut"] == 32
    assert splits["model.up_blocks.1.resnets.1.conv1"] == 16
    assert not any(name.startswith("model.down_blocks") for name in splits)


def test_dit_roles():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    roles = _roles(Denoiser(dit.eval()))
    assert roles["model.pos_embed.proj"] == {"first"}
    assert roles["model.transformer_blocks.0.norm1.linear"] == {"time_embedding"}  # adaLN: t and label only
    assert roles["model.proj_out_2"] == {"last"}  # the unpatchify einsum only moves data


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.temb = nn.Linear(1, 4)
        self.cemb = nn.Linear(3, 4)
        self.inp = nn.Conv2d(2, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x, t, cond):
        e = self.temb(t.float()[:, None]) + self.cemb(cond)
        h = self.inp(x) + e[:, :, None, None]
        h2 = self.body(torch.relu(h)) + self.skip(h)
        return self.out(torch.cat([h2, h], 1))


def test_roles_on_a_plain_module():
    den = Denoiser(Toy().eval(), sample_shape=(2, 6, 6), cond_kind="hidden_states", cond_shape=(3,))
    graph = capture(den, batch=2)
    roles = {layer.name: set(layer.roles) for layer in graph.layers}
    # cemb makes a per-sample vector from the condition (a pooled embedding feeding the modulation)
    assert roles == {"model.temb": {"time_embedding"}, "model.cemb": {"time_embedding"}, "model.inp": {"first"},
                     "model.body": {"body"}, "model.skip": {"shortcut"}, "model.out": {"last"}}
    assert {layer.name: layer.concat_split for layer in graph.layers}["model.out"] == 4
