"""Tiny random-weight instances of the diffusers families diffpress adapts, built from configs (no download)."""
from __future__ import annotations

import diffusers
import torch

FAMILIES: dict[str, tuple[str, dict]] = {
    "unet2d": ("UNet2DModel", dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)),
    "sd": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)),
    "sdxl": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(4, 8), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 24)),
    "dit": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)),
    "pixart": ("PixArtTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=32, use_additional_conditions=False)),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=16)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))),
    "sana": ("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=16, patch_size=1)),
    "auraflow": ("AuraFlowTransformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64)),
    "hunyuandit": ("HunyuanDiT2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=16, hidden_size=16,
        num_layers=2, mlp_ratio=2.0, cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16,
        text_len=8, text_len_t5=8)),
}


def build(family: str, seed: int = 0):
    """A tiny instance of ``family`` with random weights (seeded), in eval mode."""
    cls_name, config = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**config).eval()


def meta_denoiser(name: str):
    """A real-size zoo architecture (``diffpress.zoo.architectures``) at latent 8 on the meta device (shapes only)
    as a Denoiser, and example inputs for its capture."""
    from diffpress import Denoiser
    from diffpress.zoo.architectures import build as build_architecture

    model = build_architecture(name, sample_size=8, device="meta")
    den = Denoiser(model, cond_shape=(77, model.config.cross_attention_dim) if name == "sd15-unet" else None)
    return den, tuple(a.to("meta") if a is not None else None for a in den.example_inputs(1))
