"""Denoiser: one calling convention over diffusers UNets / DiT / PixArt and plain modules."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

import diffpress
from diffpress import Denoiser, DiffpressError

KINDS = ("unet2d", "unet2d_condition", "dit", "pixart", "module")
DIFFUSERS_KINDS = KINDS[:4]


def raw_call(den: Denoiser, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The wrapped model called directly, with the keyword arguments its own pipeline would use."""
    m = den.model
    if den.kind == "unet2d":
        return m(x, t).sample
    if den.kind == "unet2d_condition":
        return m(x, t, encoder_hidden_states=cond).sample
    if den.kind == "dit":
        return m(x, timestep=t, class_labels=cond).sample
    if den.kind == "pixart":
        return m(x, encoder_hidden_states=cond, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return m(x, t, cond)


# -- the calling convention ------------------------------------------------------------------------
@pytest.mark.parametrize("side", [8, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_equals_raw_model(kind, side, tiny, cond_for, sizes):
    den = tiny(kind)
    c = sizes.channels
    x = torch.randn(3, c, side, side, generator=torch.Generator().manual_seed(side))
    cond = cond_for(den, 3, tokens=4)
    with torch.no_grad():
        out = den(x, 421, cond)  # a python int timestep is broadcast to the batch
        raw = raw_call(den, x, torch.full((3,), 421, dtype=torch.long), cond)
    assert out.shape == x.shape == (3, c, side, side)
    if kind in ("dit", "pixart"):  # learned sigma: the model returns [eps, var], the denoiser eps only
        assert raw.shape == (3, 2 * c, side, side)
        raw = raw[:, :c]
    assert torch.equal(out, raw)
    assert torch.isfinite(out).all()
    # the prediction depends on the timestep
    with torch.no_grad():
        other_t = den(x, 37, cond)
    assert (other_t - out).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_timestep_forms_agree(kind, tiny, cond_for, sizes):
    """A 0-d tensor, a python number and a per-sample vector are the same timestep."""
    den = tiny(kind)
    x = torch.randn(2, sizes.channels, 8, 8)
    cond = cond_for(den, 2, tokens=4)
    with torch.no_grad():
        a = den(x, torch.tensor(250), cond)
        b = den(x, 250, cond)
        c = den(x, torch.tensor([250, 250]), cond)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_learned_sigma_split_only_when_out_channels_doubled(builders, sizes):
    c = sizes.channels
    x = torch.randn(2, c, 8, 8)
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        sigma_model = builders.dit(out_channels=2 * c)
        den = Denoiser(sigma_model)
        full = sigma_model(x, timestep=torch.tensor([10, 10]), class_labels=labels).sample
        assert full.shape[1] == 2 * c
        assert torch.equal(den(x, 10, labels), full[:, :c])

        plain_model = builders.dit(out_channels=c)
        den = Denoiser(plain_model)
        full = plain_model(x, timestep=torch.tensor([10, 10]), class_labels=labels).sample
        assert full.shape[1] == c
        assert torch.equal(den(x, 10, labels), full)


@pytest.mark.parametrize("wrap", ["tuple", "sample_attr"])
def test_plain_module_outputs_are_unwrapped(wrap, builders, sizes):
    inner = builders.plain()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, cond):
            out = self.inner(x, t, cond)
            return (out, out * 2) if wrap == "tuple" else SimpleNamespace(sample=out)

    den = Denoiser(Wrapped(), sample_shape=(sizes.channels, 8, 8))
    x = torch.randn(2, sizes.channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, 5), inner(x, torch.tensor([5, 5]), None))


# -- what the denoiser detects ---------------------------------------------------------------------
def test_detected_facts(unet2d, cond_unet, dit, pixart, plain, sizes):
    c, s = sizes.channels, sizes.side
    got = {d.kind: (d.cond_kind, d.sample_shape, d.prediction_type, d.num_classes, d.cond_shape, d.supports_guidance)
           for d in (unet2d, cond_unet, dit, pixart, plain)}
    assert got == {
        "unet2d": ("none", (c, s, s), "epsilon", None, (), False),
        "unet2d_condition": ("hidden_states", (c, s, s), "epsilon", sizes.num_classes, (sizes.tokens, sizes.dim), True),
        "dit": ("class", (c, s, s), "epsilon", sizes.num_classes, (), True),
        "pixart": ("hidden_states", (c, s, s), "epsilon", None, (120, sizes.caption), True),
        "module": ("none", (c, s, s), "epsilon", None, (), False),
    }


def test_cond_unet_without_conditioner_defaults_to_clip_tokens(builders, sizes):
    den = Denoiser(builders.cond_unet())
    assert den.cond_kind == "hidden_states" and den.cond_shape == (77, sizes.dim) and den.num_classes is None
    with pytest.raises(DiffpressError, match="no label conditioner"):
        den.encode_labels([1])


def test_class_conditional_unet2d_and_rectangular_sample_size(builders, sizes):
    den = Denoiser(builders.unet2d(num_class_embeds=4, sample_size=(8, 12)))
    assert den.kind == "unet2d" and den.cond_kind == "class" and den.num_classes == 4
    assert den.sample_shape == (sizes.channels, 8, 12)
    x = torch.randn(2, sizes.channels, 8, 12)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        out = den(x, 3, labels)
        raw = den.model(x, torch.tensor([3, 3]), class_labels=labels).sample
        other = den(x, 3, torch.tensor([1, 2]))
    assert out.shape == (2, sizes.channels, 8, 12) and torch.equal(out, raw)
    assert (out - other).abs().max() > 1e-4  # the labels reach the model


def test_prediction_type_sources(builders):
    model = builders.unet2d()
    sched = DDIMScheduler(prediction_type="v_prediction")
    assert Denoiser(model).prediction_type == "epsilon"
    assert Denoiser(model, scheduler_config=sched).prediction_type == "v_prediction"
    assert Denoiser(model, scheduler_config=sched, prediction_type="sample").prediction_type == "sample"
    with pytest.raises(DiffpressError, match=r"unknown prediction_type 'eps'.*'epsilon', 'v_prediction', 'sample'"):
        Denoiser(model, prediction_type="eps")


def test_overrides_and_bad_cond_kind(builders, sizes):
    den = Denoiser(builders.plain(), sample_shape=(2, 4, 4), cond_kind="class", num_classes=5)
    assert (den.kind, den.cond_kind, den.num_classes, den.sample_shape) == ("module", "class", 5, (2, 4, 4))
    assert torch.equal(den.null_cond(3), torch.full((3,), 5))
    hs = Denoiser(builders.plain(), sample_shape=(2, 4, 4), cond_kind="hidden_states", cond_shape=(7, 3))
    assert hs.cond_shape == (7, 3) and torch.equal(hs.null_cond(2), torch.zeros(2, 7, 3))
    with pytest.raises(DiffpressError, match="unknown cond_kind 'text'"):
        Denoiser(builders.plain(), sample_shape=(2, 4, 4), cond_kind="text")
    with pytest.raises(DiffpressError, match=r"cond_shape=\(tokens, dim\)"):
        Denoiser(builders.plain(), sample_shape=(2, 4, 4), cond_kind="hidden_states")


# -- labels and the null condition -----------------------------------------------------------------
def test_dit_labels_and_null_label(dit, sizes):
    labels = dit.encode_labels([1, 4])
    assert labels.dtype == torch.long and torch.equal(labels, torch.tensor([1, 4]))
    null = dit.null_cond(3)
    assert torch.equal(null, torch.full((3,), sizes.num_classes))
    # the null label is the extra CFG row of the DiT label table, not an out-of-range index
    table = dit.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == sizes.num_classes + 1
    x = torch.randn(3, sizes.channels, 8, 8)
    with torch.no_grad():
        uncond = dit(x, 100, null)
        cond = dit(x, 100, torch.tensor([0, 0, 0]))
    assert uncond.shape == x.shape and (uncond - cond).abs().max() > 1e-4


def test_conditioner_labels_and_null_label(cond_unet, label_embedding, sizes):
    labels = torch.tensor([0, 2, 4])
    tokens = cond_unet.encode_labels(labels)
    assert tokens.shape == (3, sizes.tokens, sizes.dim)
    with torch.no_grad():
        assert torch.equal(tokens, label_embedding(labels))
        null = cond_unet.null_cond(2)
        assert torch.equal(null, label_embedding(torch.full((2,), sizes.num_classes)))
    assert label_embedding.null_label == sizes.num_classes
    assert not torch.equal(null[0], tokens[0])


def test_pixart_null_cond_is_zero_states(pixart, sizes):
    null = pixart.null_cond(2)
    assert null.shape == (2, 120, sizes.caption) and not null.any()
    with pytest.raises(DiffpressError, match="no label conditioner; pass cond directly"):
        pixart.encode_labels([0])


def test_unconditional_has_no_null_cond(unet2d):
    with pytest.raises(DiffpressError, match="no null condition"):
        unet2d.null_cond(2)


def test_class_unet2d_with_explicit_null_class(builders, sizes):
    """A class UNet trained with a null class (num_class_embeds = num_classes + 1) guides with it."""
    den = Denoiser(builders.unet2d(num_class_embeds=5), num_classes=4).eval()
    assert den.supports_guidance and torch.equal(den.null_cond(2), torch.tensor([4, 4]))
    out = diffpress.sample(den, labels=[0, 3], guidance=2.0, steps=2, progress=False)
    assert out.images.shape == (2, sizes.channels, 8, 8) and out.calls == 4


def test_class_unet2d_null_cond_is_valid_or_refused(builders, sizes):
    den = Denoiser(builders.unet2d(num_class_embeds=5))
    x = torch.randn(2, sizes.channels, 8, 8)
    if den.supports_guidance:
        null = den.null_cond(2)
        assert int(null.max()) < den.model.config.num_class_embeds
        with torch.no_grad():
            assert den(x, 10, null).shape == x.shape
    else:
        with pytest.raises(DiffpressError):
            den.null_cond(2)


def test_model_without_sample_size_takes_sample_shape(builders, sizes):
    model = builders.unet2d(sample_size=None)
    den = Denoiser(model, sample_shape=(sizes.channels, 8, 8))
    assert den.sample_shape == (sizes.channels, 8, 8)
    with pytest.raises(DiffpressError, match="sample_shape"):
        Denoiser(model)


def test_single_element_timestep_is_broadcast(pixart, cond_for, sizes):
    x = torch.randn(2, sizes.channels, 8, 8)
    cond = cond_for(pixart, 2, tokens=4)
    with torch.no_grad():
        assert torch.equal(pixart(x, torch.tensor([7]), cond), pixart(x, 7, cond))


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_wrong_channel_count(kind, tiny, cond_for, sizes):
    den = tiny(kind)
    cond = cond_for(den, 2, tokens=4)
    with pytest.raises(DiffpressError, match=r"x_t has shape \(2, 3, 8, 8\); this denoiser takes \(B, 2, H, W\)"):
        den(torch.randn(2, 3, 8, 8), 10, cond)
    with pytest.raises(DiffpressError, match=r"x_t has shape \(2, 8, 8\)"):
        den(torch.randn(2, 8, 8), 10, cond)


@pytest.mark.parametrize("kind,cond_kind", [("unet2d_condition", "hidden_states"), ("dit", "class"),
                                            ("pixart", "hidden_states")])
def test_missing_cond(kind, cond_kind, tiny, sizes):
    with pytest.raises(DiffpressError, match=rf"this denoiser is conditional \({cond_kind}\); pass cond"):
        tiny(kind)(torch.randn(1, sizes.channels, 8, 8), 10)


def test_plain_module_needs_sample_shape(builders):
    with pytest.raises(DiffpressError, match=r"TinyNet is not a diffusers model.*pass sample_shape=\(C, H, W\)"):
        Denoiser(builders.plain())


def test_example_inputs(dit, pixart, cond_unet, plain, sizes):
    x, t, cond = dit.example_inputs(3, seed=1)
    assert x.shape == (3, sizes.channels, 8, 8) and torch.equal(t, torch.full((3,), 500))
    assert cond.dtype == torch.long and cond.shape == (3,) and int(cond.max()) < sizes.num_classes
    x2, _, cond2 = dit.example_inputs(3, seed=1)
    assert torch.equal(x, x2) and torch.equal(cond, cond2)
    assert pixart.example_inputs(2, (sizes.channels, 16, 16))[2].shape == (2, 120, sizes.caption)
    assert pixart.example_inputs(2, (sizes.channels, 16, 16))[0].shape == (2, sizes.channels, 16, 16)
    assert cond_unet.example_inputs(2)[2].shape == (2, sizes.tokens, sizes.dim)
    assert plain.example_inputs(2)[2] is None


# -- persistence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_save_load_round_trip(kind, tiny, cond_for, sizes, tmp_path):
    den = tiny(kind)
    out_dir = den.save_pretrained(tmp_path / "saved")
    assert out_dir == tmp_path / "saved"
    key = "transformer" if kind in ("dit", "pixart") else "unet"
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index[key] == ["diffusers", type(den.model).__name__]
    assert (out_dir / key / "config.json").is_file()
    assert list((out_dir / key).glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folder left behind

    loaded = diffpress.load(out_dir)
    def facts(d):
        return d.kind, d.cond_kind, d.sample_shape, d.prediction_type, d.num_classes, d.cond_shape

    assert facts(loaded) == facts(den)
    assert not loaded.model.training
    x = torch.randn(2, sizes.channels, 8, 8)
    cond = cond_for(den, 2, tokens=4)
    with torch.no_grad():
        assert torch.equal(loaded(x, 300, cond), den(x, 300, cond))


def test_save_load_round_trip_with_conditioner_and_scheduler(builders, sizes, tmp_path):
    sched = dict(DDIMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2").config)
    sched["_class_name"] = "DDIMScheduler"
    den = Denoiser(builders.cond_unet(), conditioner=builders.label_embedding(), scheduler_config=sched).eval()
    den.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["conditioner"] == ["diffpress", "LabelEmbedding"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["diffpress"] == {"prediction_type": "v_prediction"}

    loaded = diffpress.load(tmp_path / "p")
    assert loaded.prediction_type == "v_prediction"
    assert loaded.scheduler_config["_class_name"] == "DDIMScheduler"
    assert loaded.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert type(diffpress.make_scheduler(loaded, None)).__name__ == "DDIMScheduler"
    assert loaded.num_classes == sizes.num_classes and loaded.cond_shape == (sizes.tokens, sizes.dim)
    labels = torch.tensor([1, 5])  # 5 = the null label
    with torch.no_grad():
        assert torch.equal(loaded.encode_labels(labels), den.encode_labels(labels))
        x = torch.randn(2, sizes.channels, 8, 8)
        assert torch.equal(loaded(x, 50, loaded.encode_labels(labels)), den(x, 50, den.encode_labels(labels)))


def test_save_refuses_to_overwrite_without_force(builders, tmp_path):
    model = builders.unet2d()
    Denoiser(model).save_pretrained(tmp_path / "m")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()}

    with pytest.raises(DiffpressError, match="already exists; pass --force"):
        Denoiser(model, prediction_type="v_prediction").save_pretrained(tmp_path / "m")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert after == before
    assert diffpress.load(tmp_path / "m").prediction_type == "epsilon"

    Denoiser(model, prediction_type="v_prediction").save_pretrained(tmp_path / "m", force=True)
    assert diffpress.load(tmp_path / "m").prediction_type == "v_prediction"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_plain_module_cannot_be_saved(plain, tmp_path):
    with pytest.raises(DiffpressError, match="TinyNet is a plain nn.Module"):
        plain.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_copy_is_independent(dit, sizes):
    twin = dit.copy()
    assert (twin.kind, twin.num_classes, twin.sample_shape) == (dit.kind, dit.num_classes, dit.sample_shape)
    with torch.no_grad():
        twin.model.proj_out_2.weight.add_(1.0)
    assert not torch.equal(twin.model.proj_out_2.weight, dit.model.proj_out_2.weight)
