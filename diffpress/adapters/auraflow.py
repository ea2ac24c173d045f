"""diffusers AuraFlowTransformer2DModel (AuraFlow, MMDiT + single DiT blocks): T5 hidden states; flow matching,
timesteps enter as ``t / 1000``, as the pipeline passes them."""
from __future__ import annotations

from diffpress.adapters.base import FlowAdapter, Part


class AuraFlow(FlowAdapter):
    name = "auraflow"
    classes = ("AuraFlowTransformer2DModel",)

    def parts(self, model, sample_shape):
        return {"encoder_hidden_states": Part((256, model.config.joint_attention_dim))}

    def forward(self, model, x, t, cond):
        return model(x, encoder_hidden_states=cond, timestep=t / 1000).sample
