"""The digits dataset (ships with scikit-learn) as 16x16 images in [-1, 1].

scikit-learn's digits are 8x8 with 17 grey levels. They are upsampled to 16x16 (bilinear): the content
is 8x8, so 32x32 would add compute and nothing to learn, while 16x16 still gives a UNet three
resolution levels (16, 8, 4) and a DiT 64 patches of 2x2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpress.errors import DiffpressError

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images ``(N, 1, 16, 16)`` float32 in [-1, 1], labels ``(N,)`` int64.

    ``split`` is ``"all"``, ``"train"`` (a fixed, seeded 80 %) or ``"test"`` (the other 20 %).

    >>> x, y = load_digits("test")
    >>> x.shape[1:], float(x.min()) >= -1.0
    (torch.Size([1, 16, 16]), True)
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # the data lives in scikit-learn, an optional extra
        raise DiffpressError(
            "the digits data needs scikit-learn: pip install 'diffpress[digits]'"
        ) from exc
    data = _sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    if split == "train":
        idx = perm[:cut]
    elif split == "test":
        idx = perm[cut:]
    else:
        raise DiffpressError(f"unknown split {split!r}; allowed: 'all', 'train', 'test'")
    return images[idx], labels[idx]
