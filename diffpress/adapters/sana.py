"""diffusers SanaTransformer2DModel (Sana): Gemma hidden states, linear attention; flow matching, timesteps
scaled by the config's ``timestep_scale`` as the pipeline does; optional distilled guidance as a part."""
from __future__ import annotations

from diffpress.adapters.base import FlowAdapter, Part


class Sana(FlowAdapter):
    name = "sana"
    classes = ("SanaTransformer2DModel",)

    def parts(self, model, sample_shape):
        parts = {"encoder_hidden_states": Part((300, model.config.caption_channels))}
        if model.config.guidance_embeds:
            parts["guidance"] = Part((), null="same", fill=4.5)
        return parts

    def forward(self, model, x, t, cond):
        kw = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        return model(x, timestep=t * model.config.timestep_scale, **kw).sample
