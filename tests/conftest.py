"""Shared fixtures: tiny random-weight denoisers of every supported kind, built from configs.

Every model here runs a forward pass in milliseconds. The model fixtures are session-scoped (several
test modules capture or save them once); tests must not change their weights or modes in place:
take ``den.copy()`` first. Each builder seeds torch itself, so the weights do not depend on test order.
"""
from __future__ import annotations

import contextlib
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from diffpress import Denoiser
from diffpress.zoo.conditioner import LabelEmbedding

# The sizes all tiny models share. ``side`` is the configured sample_size; tests also run 2 * side.
SIZES = SimpleNamespace(channels=2, side=8, num_classes=5, tokens=3, dim=16, caption=12, patch=2)


# Under pytest-xdist (the README's test command runs one worker per core) each worker gets its share of the
# cores, so the workers' intra-op thread pools do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded_build(seed: int):
    """Seed a model build without disturbing the global RNG of the test that asked for it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state."""
    seed_all(0)


# -- builders ----------------------------------------------------------------------------------------
def build_unet2d(**overrides) -> UNet2DModel:
    """Unconditional pixel UNet, two resolution levels, self-attention at the lower one."""
    config = dict(sample_size=SIZES.side, in_channels=SIZES.channels, out_channels=SIZES.channels,
                  layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    config.update(overrides)
    with _seeded_build(1):
        return UNet2DModel(**config).eval()


def build_cond_unet() -> UNet2DConditionModel:
    """Cross-attention UNet whose encoder states are ``(tokens, dim)`` label tokens."""
    with _seeded_build(2):
        return UNet2DConditionModel(
            sample_size=SIZES.side, in_channels=SIZES.channels, out_channels=SIZES.channels, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, cross_attention_dim=SIZES.dim,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ).eval()


def build_label_embedding() -> LabelEmbedding:
    with _seeded_build(3):
        return LabelEmbedding(num_classes=SIZES.num_classes, num_tokens=SIZES.tokens, dim=SIZES.dim).eval()


def build_dit(out_channels: int = 2 * SIZES.channels) -> DiTTransformer2DModel:
    """Class-conditional DiT; by default with learned sigma (out_channels = 2 * in_channels), like DiT-XL/2."""
    with _seeded_build(4):
        return DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=SIZES.channels, out_channels=out_channels,
            num_layers=2, sample_size=SIZES.side, patch_size=SIZES.patch, num_embeds_ada_norm=SIZES.num_classes,
        ).eval()


def build_pixart() -> PixArtTransformer2DModel:
    """Text-conditional PixArt-alpha transformer (learned sigma, no resolution / aspect-ratio conditions)."""
    with _seeded_build(5):
        return PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=SIZES.channels,
            out_channels=2 * SIZES.channels, num_layers=2, cross_attention_dim=16, caption_channels=SIZES.caption,
            sample_size=SIZES.side, patch_size=SIZES.patch, use_additional_conditions=False,
        ).eval()


class TinyNet(nn.Module):
    """A plain denoiser, ``forward(x, t, cond)``; ``cond`` (optional) are class labels in ``[0, num_classes]``."""

    def __init__(self, channels: int = SIZES.channels, hidden: int = 8, num_classes: int = SIZES.num_classes):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time(t.float().reshape(-1, 1) / 1000.0)
        h = self.conv_in(x) + temb[:, :, None, None]
        if cond is not None:
            h = h + self.label(cond)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


def build_digits_dit() -> DiTTransformer2DModel:
    """An untrained class-conditional DiT with the digits shape (1x16x16, 10 classes), one block: fast, and it
    triggers the digits metrics (FD, conditional accuracy)."""
    with _seeded_build(0):
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                     num_layers=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10).eval()


def build_plain() -> TinyNet:
    with _seeded_build(6):
        return TinyNet().eval()


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sizes() -> SimpleNamespace:
    return SIZES


@pytest.fixture(scope="session")
def unet2d() -> Denoiser:
    return Denoiser(build_unet2d()).eval()


@pytest.fixture(scope="session")
def label_embedding() -> LabelEmbedding:
    return build_label_embedding()


@pytest.fixture(scope="session")
def cond_unet(label_embedding) -> Denoiser:
    return Denoiser(build_cond_unet(), conditioner=label_embedding).eval()


@pytest.fixture(scope="session")
def dit() -> Denoiser:
    return Denoiser(build_dit()).eval()


@pytest.fixture(scope="session")
def pixart() -> Denoiser:
    return Denoiser(build_pixart()).eval()


@pytest.fixture(scope="session")
def plain() -> Denoiser:
    return Denoiser(build_plain(), sample_shape=(SIZES.channels, SIZES.side, SIZES.side)).eval()


@pytest.fixture(scope="session")
def tiny_digits_dit() -> Denoiser:
    """:func:`build_digits_dit` with the zoo's training scheduler."""
    from diffpress.zoo.models import training_scheduler

    return Denoiser(build_digits_dit(), scheduler_config=training_scheduler()).eval()


_FIXTURE_OF_KIND = {"unet2d": "unet2d", "unet2d_condition": "cond_unet", "dit": "dit", "pixart": "pixart",
                    "module": "plain"}


@pytest.fixture(scope="session")
def tiny(request):
    """``tiny(kind)``: the session's tiny Denoiser of ``kind`` (unet2d, unet2d_condition, dit, pixart, module)."""
    return lambda kind: request.getfixturevalue(_FIXTURE_OF_KIND[kind])


@pytest.fixture(scope="session")
def builders() -> SimpleNamespace:
    """Fresh (unwrapped) model builders, for tests that need their own copy or a variant."""
    return SimpleNamespace(unet2d=build_unet2d, cond_unet=build_cond_unet, label_embedding=build_label_embedding,
                           dit=build_dit, pixart=build_pixart, plain=build_plain, TinyNet=TinyNet,
                           digits_dit=build_digits_dit)


def make_cond(den: Denoiser, batch: int, seed: int = 0, tokens: int | None = None) -> torch.Tensor | None:
    """A valid ``cond`` for ``den``: labels for class models, encoded labels with a conditioner, random states
    of ``(tokens, dim)`` for a text-conditional model, ``None`` for an unconditional one."""
    g = torch.Generator().manual_seed(seed)
    if den.cond_kind == "none":
        return None
    if den.cond_kind == "class" or den.conditioner is not None:
        return den.encode_labels(torch.randint(0, den.num_classes, (batch,), generator=g))
    n, dim = den.cond_shape
    return torch.randn(batch, tokens or n, dim, generator=g)


@pytest.fixture(scope="session")
def cond_for():
    """``cond_for(den, batch, seed=0, tokens=None)``: a valid ``cond`` for ``den`` (see ``make_cond``)."""
    return make_cond


def build_quant_unet(side: int = 8) -> Denoiser:
    """A 1-channel label-conditional UNet with the digits model's layout at tiny width (16/32 channels):
    skip-concats in the decoder, self- and cross-attention; for quantization, roles and export tests."""
    from diffpress.zoo.models import training_scheduler

    with _seeded_build(7):
        unet = UNet2DConditionModel(
            sample_size=side, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=8, attention_head_dim=8, cross_attention_dim=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        emb = LabelEmbedding(10, 2, 16)
    return Denoiser(unet.eval(), conditioner=emb.eval(), scheduler_config=training_scheduler()).eval()


@pytest.fixture(scope="session")
def make_quant_unet():
    """The :func:`build_quant_unet` builder (call it with the sample side you need)."""
    return build_quant_unet
