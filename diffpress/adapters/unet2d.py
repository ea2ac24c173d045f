"""diffusers UNet2DModel (DDPM / DDIM pixel or latent UNets): unconditional, or class labels through class_embedding."""
from __future__ import annotations

import torch

from diffpress.adapters.base import Adapter, Part


class UNet2D(Adapter):
    name = "unet2d"
    classes = ("UNet2DModel",)
    component = "unet"

    def parts(self, model, sample_shape):
        return {"class_labels": Part((), torch.long, null="label")} if model.config.num_class_embeds else {}

    def labels(self, model):
        return model.config.num_class_embeds, None  # a null class exists only if it was trained with one

    def forward(self, model, x, t, cond):
        return model(x, t, class_labels=cond).sample
