"""diffusers PixArtTransformer2DModel (PixArt-alpha / sigma): T5 hidden states and their attention mask (all
ones unless given: the pipeline passes the tokenizer's mask); optional resolution and aspect-ratio
conditions (PixArt-alpha 1024) derived from the latent size, as the pipeline does."""
from __future__ import annotations

import torch

from diffpress.adapters.base import Adapter, Part


class PixArt(Adapter):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    tokens = 120  # PixArt-alpha's max_sequence_length (PixArt-sigma uses 300: give its embeddings in a file)

    def parts(self, model, sample_shape):
        c = model.config
        return {"encoder_hidden_states": Part((self.tokens, c.caption_channels or c.cross_attention_dim)),
                "encoder_attention_mask": Part((self.tokens,), torch.long, null="same", fill=1)}

    def forward(self, model, x, t, cond):
        extra = {"resolution": None, "aspect_ratio": None}
        if model.config.use_additional_conditions:  # sizes in pixels, assuming an 8x VAE
            b, _, h, w = x.shape
            extra = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).expand(b, 2),
                     "aspect_ratio": torch.tensor([[h / w]]).expand(b, 1)}
        return model(x, timestep=t, added_cond_kwargs=extra, **cond).sample

    def encode_prompts(self, pipe, prompts):
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device="cpu",
                                                         max_sequence_length=self.tokens)
        return ({"encoder_hidden_states": embeds, "encoder_attention_mask": mask},
                {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask})
