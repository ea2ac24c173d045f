import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffpress import Denoiser
from diffpress.zoo.models import training_scheduler


@pytest.fixture(scope="module")
def tiny_digits_dit() -> Denoiser:
    """An untrained class-conditional DiT with the digits shape (1x16x16, 10 classes): fast, and it
    triggers the digits metrics (FD, conditional accuracy)."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                  num_layers=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10)
    return Denoiser(model.eval(), scheduler_config=training_scheduler())


@pytest.fixture
def perturbed():
    """Returns ``f(den, std)``: a copy of ``den`` with Gaussian noise of ``std`` added to every weight."""

    def make(den: Denoiser, std: float, seed: int = 0) -> Denoiser:
        out = den.copy()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in out.parameters():
                p.add_(std * torch.randn(p.shape, generator=g))
        return out

    return make
