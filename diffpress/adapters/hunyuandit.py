"""diffusers HunyuanDiT2DModel (Hunyuan-DiT): CLIP and T5 hidden states with their masks, image size ids and a
style id; 2-D rotary position embeddings built from the latent size as the pipeline does; learned sigma."""
from __future__ import annotations

import torch

from diffpress.adapters.base import Adapter, Part


class HunyuanDiT(Adapter):
    name = "hunyuandit"
    classes = ("HunyuanDiT2DModel",)
    timestep_dtype = torch.float32

    def parts(self, model, sample_shape):
        c = model.config
        parts = {"encoder_hidden_states": Part((c.text_len, c.cross_attention_dim)),
                 "text_embedding_mask": Part((c.text_len,), torch.long, null="same", fill=1),
                 "encoder_hidden_states_t5": Part((c.text_len_t5, c.cross_attention_dim_t5)),
                 "text_embedding_mask_t5": Part((c.text_len_t5,), torch.long, null="same", fill=1)}
        if c.use_style_cond_and_image_meta_size:
            _, h, w = sample_shape  # original size, target size, crop top-left, in pixels (an 8x VAE)
            parts["image_meta_size"] = Part((6,), null="same", fill=(h * 8.0, w * 8.0, h * 8.0, w * 8.0, 0.0, 0.0))
            parts["style"] = Part((), torch.long, null="same", fill=0)
        return parts

    def forward(self, model, x, t, cond):
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        p = model.config.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        rope = get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, _crop_region(grid, 512 // 8 // p), grid,
                                       output_type="pt")
        return model(x, t.to(x.dtype), image_rotary_emb=rope, **cond).sample  # its embedder takes float timesteps


def _crop_region(grid: tuple[int, int], base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The pipeline's ``get_resize_crop_region_for_grid`` (its module imports transformers, so it is restated
    here): the grid resized into a ``base`` square, keeping its aspect ratio, and centred."""
    h, w = grid
    rh, rw = (base, int(round(base / h * w))) if h / w > 1 else (int(round(base / w * h)), base)
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)
