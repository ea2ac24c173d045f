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


def test_mmdit_and_sdxl_roles():
    """Per-sample vectors made without x_t (timestep, pooled-text and size embedders, adaLN modulation) are
    time_embedding; the text stream before the first joint attention is cond_projection; joint attention's
    q / k / v are found through the token concatenation, q/k norms and rotary embeddings."""
    from families import build

    import diffpress

    sd3 = _roles(Denoiser(build("sd3")))
    block = "model.transformer_blocks.0"
    assert sd3["model.time_text_embed.text_embedder.linear_1"] == {"time_embedding"}  # pooled text
    assert sd3[f"{block}.norm1_context.linear"] == {"time_embedding"}
    assert sd3["model.context_embedder"] == {"cond_projection"}
    assert sd3[f"{block}.attn.add_q_proj"] == {"attn_q", "cond_projection"}
    assert sd3[f"{block}.attn.to_k"] == {"attn_k"} and sd3[f"{block}.attn.to_add_out"] == {"attn_out"}
    assert sd3["model.transformer_blocks.1.attn.add_v_proj"] == {"attn_v"}  # the text stream has seen x_t

    flux = _roles(Denoiser(build("flux"), sample_shape=(4, 16, 16)))
    assert flux["model.time_text_embed.text_embedder.linear_2"] == {"time_embedding"}
    assert flux[f"{block}.attn.to_q"] == {"attn_q"}  # through RMS q-norm and rotary embedding
    assert flux[f"{block}.attn.add_k_proj"] == {"attn_k", "cond_projection"}
    assert flux[f"{block}.attn.to_add_out"] == {"attn_out"}  # the joint output, split back into two streams
    assert flux["model.single_transformer_blocks.0.attn.to_v"] == {"attn_v"}

    sdxl = Denoiser(build("sdxl"))
    roles = _roles(sdxl)
    assert roles["model.add_embedding.linear_1"] == {"time_embedding"}  # pooled text + size ids
    # the default skip roles keep the vector path in float and quantize the text stream
    q = sdxl.copy()
    cs = diffpress.calibrate(sdxl, num_samples=2, steps=3, cond=sdxl.example_cond(2), progress=False)
    report = diffpress.quantize_(q, diffpress.QuantizeConfig(), cs, progress=False)
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert skipped["model.add_embedding.linear_2"] == "role time_embedding (skip_roles)"
    attn2 = "model.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert f"{attn2}.to_k" in {s["name"] for s in report.quantized}
