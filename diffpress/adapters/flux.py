"""diffusers FluxTransformer2DModel (FLUX.1): latents packed into 2x2 patches as tokens, image / text position
ids built from the latent size, pooled CLIP projections; FLUX.1-dev's distilled guidance as a condition part.
Timesteps enter as ``t / 1000``, as the pipeline passes them."""
from __future__ import annotations

import torch

from diffpress.adapters.base import FlowAdapter, Part


class Flux(FlowAdapter):
    name = "flux"
    classes = ("FluxTransformer2DModel",)
    guidance = 1.0  # FLUX.1 is guidance-distilled: sampled without classifier-free guidance

    def sample_shape(self, model):
        return (model.config.in_channels // 4, 128, 128)  # the pipeline's default: 1024 px through an 8x VAE

    def parts(self, model, sample_shape):
        c = model.config
        parts = {"encoder_hidden_states": Part((512, c.joint_attention_dim)),
                 "pooled_projections": Part((c.pooled_projection_dim,))}
        if c.guidance_embeds:
            parts["guidance"] = Part((), null="same", fill=3.5)
        return parts

    def forward(self, model, x, t, cond):
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, dtype=x.dtype)
        ids[..., 1] = torch.arange(h // 2, dtype=x.dtype)[:, None]
        ids[..., 2] = torch.arange(w // 2, dtype=x.dtype)[None, :]
        cond = dict(cond)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, dtype=x.dtype)
        out = model(tokens, timestep=t / 1000, img_ids=ids.reshape(-1, 3), txt_ids=txt_ids, **cond).sample
        out = out.reshape(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, -1, h, w)

    def encode_prompts(self, pipe, prompts):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu")
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None
