import pytest
import torch

from diffpress import Denoiser


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
