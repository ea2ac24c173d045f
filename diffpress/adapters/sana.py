"""diffusers SanaTransformer2DModel (Sana): Gemma hidden states and their attention mask (all ones unless
given), linear attention; flow matching, timesteps scaled by the config's ``timestep_scale`` as the pipeline
does; optional distilled guidance as a part."""
from __future__ import annotations

import torch

from diffpress.adapters.base import FlowAdapter, Part


class Sana(FlowAdapter):
    name = "sana"
    classes = ("SanaTransformer2DModel",)

    tokens = 300  # the pipeline's max_sequence_length

    def parts(self, model, sample_shape):
        parts = {"encoder_hidden_states": Part((self.tokens, model.config.caption_channels)),
                 "encoder_attention_mask": Part((self.tokens,), torch.long, null="same", fill=1)}
        if model.config.guidance_embeds:
            parts["guidance"] = Part((), null="same", fill=4.5)
        return parts

    def forward(self, model, x, t, cond):
        return model(x, timestep=t * model.config.timestep_scale, **cond).sample
