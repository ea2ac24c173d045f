"""Sample grids as PNG: one titled row per image set (reference, candidate, difference)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffpress._io import atomic_file
from diffpress.errors import DiffpressError


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8; other channel counts show their first three."""
    x = images.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 2:
        x = torch.cat([x, x[:, :1]], 1)
    x = x[:, :3]
    return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def difference(reference: torch.Tensor, candidate: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|candidate - reference| scaled by ``gain`` and mapped to [-1, 1] (black = identical)."""
    return ((candidate - reference).abs() * gain / 2).clamp(0, 1) * 2 - 1


def make_grid(rows: list[tuple[str, torch.Tensor]], scale: int = 4, pad: int = 2) -> Image.Image:
    """A PIL image with one row per ``(title, images)``; each image is upscaled ``scale`` times (nearest)."""
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t, _ in rows)
    n = max(len(im) for _, im in rows)
    h, w = rows[0][1].shape[-2] * scale, rows[0][1].shape[-1] * scale
    canvas = Image.new("RGB", (label_w + n * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (title, images) in enumerate(rows):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), title, fill=(0, 0, 0), font=font)
        for c, img in enumerate(_to_uint8(images)):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y))
    return canvas


def save_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path, force: bool = True, **kwargs) -> Path:
    """Write :func:`make_grid` as a PNG, atomically.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "grid.png"
    >>> _ = save_grid([("samples", torch.zeros(3, 1, 8, 8))], p)
    >>> p.stat().st_size > 0
    True
    """
    for title, images in rows:
        if not torch.isfinite(images).all():
            raise DiffpressError(f"the {title or 'sample'} images contain NaN or inf (the model diverged, or its weights "
                                 f"are broken); {path} was not written")
    with atomic_file(path, force=force) as tmp:
        make_grid(rows, **kwargs).save(tmp, format="PNG")
    return Path(path)
