"""Cacheable units found on the captured graph: UNet skip levels (nested deep parts) and DiT block residuals, on the
zoo models, the tiny diffusers families and the real-size architectures (meta device), with their MACs."""
from __future__ import annotations

import families
import pytest
import torch

import diffpress
from diffpress.errors import DiffpressError
from diffpress.graph import capture
from diffpress.graph.units import cache_units
from diffpress.zoo.architectures import ARCHITECTURES


def _check_nesting(found):
    units = found.units
    macs = [u.macs for u in units]
    assert macs == sorted(macs, reverse=True) and 0 < macs[0] < found.macs
    for i, u in enumerate(units):
        # a deeper level's deep part lies inside every shallower one
        assert set(u.inside) == set(range(i + 1, len(units))), (u.name, u.inside)


@pytest.mark.parametrize("name", ["digits-unet", "digits-cond-unet"])
def test_unet_skip_levels_nest(name):
    found = cache_units(capture(diffpress.load(name), batch=2))
    assert [u.kind for u in found.units] == ["deep"] * 6  # 3 levels x (1 resnet + 1 downsampler or conv_in)
    assert found.units[0].name == "deep@model.conv_in"
    # DeepCache's shallowest branch: everything but conv_in, the last up block's last resnet and the output head
    assert 0.85 < found.units[0].macs / found.macs < 0.95
    assert "model.mid_block" in found.units[0].modules and "model.conv_out" not in found.units[0].modules
    _check_nesting(found)


def test_dit_blocks_are_residual_units():
    den = diffpress.load("digits-dit")
    g = capture(den, batch=2)
    found = cache_units(g)
    assert [u.modules for u in found.units] == [(f"model.transformer_blocks.{i}",) for i in range(4)]
    assert all(u.kind == "residual" and not u.inside for u in found.units)
    block = sum(layer.macs for layer in g.layers if layer.name.startswith("model.transformer_blocks.0.")) // g.batch
    # DiT's forward calls block 0's timestep embedder once more for the output head: that call is not the block's
    emb = sum(layer.macs for layer in g.layers if layer.name.startswith("model.transformer_blocks.0.norm1.emb.")) // g.batch
    assert found.units[0].macs == block - emb // 2


@pytest.mark.parametrize("family", ["unet2d", "sd", "sdxl", "dit", "pixart", "sana"])
def test_families_get_units(family):
    found = cache_units(capture(diffpress.Denoiser(families.build(family)), batch=2))
    kind = "deep" if family in ("unet2d", "sd", "sdxl") else "residual"
    assert found.units and {u.kind for u in found.units} == {kind}
    if kind == "deep":
        _check_nesting(found)
    else:
        assert len(found.units) == 2 and sum(u.macs for u in found.units) < found.macs


def test_mmdit_is_refused_with_what_is_supported():
    with pytest.raises(DiffpressError, match="(?s)skip concatenations.*chain of blocks.*MMDiT"):
        cache_units(capture(diffpress.Denoiser(families.build("sd3")), batch=2))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_real_size_architectures(name):
    den, ex = families.meta_denoiser(name)
    found = cache_units(capture(den, ex))
    if "unet" in name:
        assert len(found.units) == 12 and found.units[0].kind == "deep"  # 4 levels x 3 skips
        assert found.units[0].macs / found.macs > 0.9
        _check_nesting(found)
    else:
        assert [u.kind for u in found.units] == ["residual"] * 28
        per_block = found.units[0].macs
        assert all(u.macs == per_block for u in found.units)
        assert 0.9 < 28 * per_block / found.macs < 1.0
    assert isinstance(found.macs, int) and torch.tensor(found.macs) > 0
