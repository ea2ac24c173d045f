"""LabelEmbedding: class labels as cross-attention tokens, with a null label for classifier-free guidance."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LabelEmbedding(ModelMixin, ConfigMixin):
    """Maps labels ``(B,)`` to ``(B, num_tokens, dim)`` encoder states; label ``num_classes`` is the null label.

    It plays the part a text encoder plays in a text-to-image pipeline, and saves and loads the same way
    (``save_pretrained`` / ``from_pretrained``).

    >>> emb = LabelEmbedding(num_classes=10, num_tokens=4, dim=32)
    >>> emb(torch.tensor([3, 10])).shape
    torch.Size([2, 4, 32])
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, num_tokens: int = 4, dim: int = 64):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, num_tokens * dim)
        nn.init.normal_(self.table.weight, std=1.0)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out = self.table(labels.long())
        return out.view(labels.shape[0], self.config.num_tokens, self.config.dim)
