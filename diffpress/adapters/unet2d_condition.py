"""diffusers UNet2DConditionModel: Stable Diffusion 1.x / 2.x (text hidden states) and SDXL
(``addition_embed_type="text_time"``: also pooled text embeddings and six size ids)."""
from __future__ import annotations

from diffpress.adapters.base import Adapter, Part
from diffpress.errors import DiffpressError

ADDITIONS = (None, "text_time")


class UNet2DCondition(Adapter):
    name = "unet2d_condition"
    classes = ("UNet2DConditionModel",)
    component = "unet"

    def check(self, model):
        c = model.config
        if c.addition_embed_type not in ADDITIONS:
            raise DiffpressError(f"UNet2DConditionModel with addition_embed_type={c.addition_embed_type!r} is not "
                                 f"supported; supported: {ADDITIONS} (SD 1.x/2.x and SDXL)")
        if c.class_embed_type is not None or c.num_class_embeds:
            raise DiffpressError("UNet2DConditionModel with class embeddings is not supported; register an adapter "
                                 "for it (diffpress.adapters.register)")

    def parts(self, model, sample_shape):
        c = model.config
        dim = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
        parts = {"encoder_hidden_states": Part((77, dim))}
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            _, h, w = sample_shape  # original size, crop top-left, target size in pixels (an 8x VAE)
            parts["text_embeds"] = Part((pooled,))
            parts["time_ids"] = Part((6,), null="same", fill=(h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0))
        return parts

    def forward(self, model, x, t, cond):
        if isinstance(cond, dict):
            added = {k: cond[k] for k in ("text_embeds", "time_ids")}
            return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        return model(x, t, encoder_hidden_states=cond).sample

    def encode_prompts(self, pipe, prompts):
        if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x / 2.x: the empty prompt's encoding is the null
            return pipe.encode_prompt(prompts, "cpu", 1, True)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True)
        # SDXL: the null is zeros when the pipeline forces zeros for an empty prompt; time_ids are filled in
        return ({"encoder_hidden_states": embeds, "text_embeds": pooled},
                {"encoder_hidden_states": neg, "text_embeds": neg_pooled})
