"""diffusers DiTTransformer2DModel: class-conditional DiT; label ``num_embeds_ada_norm`` is the null class."""
from __future__ import annotations

import torch

from diffpress.adapters.base import Adapter, Part


class DiT(Adapter):
    name = "dit"
    classes = ("DiTTransformer2DModel",)

    def parts(self, model, sample_shape):
        return {"class_labels": Part((), torch.long, null="label")}

    def labels(self, model):
        n = model.config.num_embeds_ada_norm  # diffusers DiT keeps a CFG embedding at index num_embeds_ada_norm
        return n, n

    def forward(self, model, x, t, cond):
        return model(x, timestep=t, class_labels=cond).sample
