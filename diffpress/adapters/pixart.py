"""diffusers PixArtTransformer2DModel (PixArt-alpha / sigma): T5 hidden states; optional resolution and
aspect-ratio conditions (PixArt-alpha 1024) derived from the latent size, as the pipeline does."""
from __future__ import annotations

import torch

from diffpress.adapters.base import Adapter, Part


class PixArt(Adapter):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)

    def parts(self, model, sample_shape):
        c = model.config
        return {"encoder_hidden_states": Part((120, c.caption_channels or c.cross_attention_dim))}

    def forward(self, model, x, t, cond):
        extra = {"resolution": None, "aspect_ratio": None}
        if model.config.use_additional_conditions:  # sizes in pixels, assuming an 8x VAE
            b, _, h, w = x.shape
            extra = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).expand(b, 2),
                     "aspect_ratio": torch.tensor([[h / w]]).expand(b, 1)}
        return model(x, encoder_hidden_states=cond, timestep=t, added_cond_kwargs=extra).sample
