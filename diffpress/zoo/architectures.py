"""Real-size denoiser architectures with random weights, for speed, scale and export work.

The configurations are those of the published checkpoints (no weights are downloaded): build one on
the ``meta`` device to inspect it for free, on ``cpu`` to run it.

>>> import torch
>>> unet = build("ddpm-cifar10-unet", device="meta")
>>> sum(p.numel() for p in unet.parameters())
35746307
"""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel

from diffpress.errors import DiffpressError

# (class, config) of each published model; sample_size is the latent / pixel side it was trained at.
ARCHITECTURES: dict[str, tuple[type, dict]] = {
    # runwayml/stable-diffusion-v1-5, unet/config.json
    "sd15-unet": (UNet2DConditionModel, dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )),
    # google/ddpm-cifar10-32
    "ddpm-cifar10-unet": (UNet2DModel, dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256), downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, norm_eps=1e-6,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )),
    # facebook/DiT-XL-2-256, transformer/config.json
    "dit-xl-2": (DiTTransformer2DModel, dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )),
    # PixArt-alpha/PixArt-XL-2-512x512, transformer/config.json
    "pixart-alpha": (PixArtTransformer2DModel, dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=64, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )),
}


def build(name: str, sample_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0):
    """Instantiate architecture ``name`` with random weights (seeded); ``sample_size`` overrides the side.

    >>> build("dit-xl-2", device="meta").config.num_layers
    28
    """
    if name not in ARCHITECTURES:
        raise DiffpressError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHITECTURES))}")
    cls, config = ARCHITECTURES[name]
    config = dict(config)
    if sample_size is not None:
        config["sample_size"] = sample_size
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    return model.eval()
