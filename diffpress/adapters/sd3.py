"""diffusers SD3Transformer2DModel (Stable Diffusion 3 / 3.5, MMDiT): joint text hidden states and pooled
projections; rectified flow, timesteps ``sigma * 1000`` as the pipeline passes them."""
from __future__ import annotations

from diffpress.adapters.base import FlowAdapter, Part


class SD3(FlowAdapter):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)

    def parts(self, model, sample_shape):
        c = model.config  # 77 CLIP tokens + 256 T5 tokens, as the SD3 pipeline concatenates them
        return {"encoder_hidden_states": Part((333, c.joint_attention_dim)),
                "pooled_projections": Part((c.pooled_projection_dim,))}

    def forward(self, model, x, t, cond):
        return model(x, timestep=t, **cond).sample

    def encode_prompts(self, pipe, prompts):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                             device="cpu", do_classifier_free_guidance=True)
        return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
                {"encoder_hidden_states": neg, "pooled_projections": neg_pooled})
