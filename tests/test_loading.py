"""diffpress.load: model folders, pipeline folders, and a clear DiffpressError for everything else."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file, save_file

import diffpress
from diffpress import DiffpressError, zoo

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory, builders):
    """A valid diffusers model folder (config.json + safetensors) of the tiny UNet, and the model itself."""
    model = builders.unet2d()
    folder = tmp_path_factory.mktemp("valid") / "unet"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def damaged(saved_unet, tmp_path):
    """A fresh copy of the valid folder, to damage."""
    folder = tmp_path / "damaged"
    shutil.copytree(saved_unet[0], folder)
    return folder


def test_model_folder_loads_with_identical_outputs(saved_unet, sizes):
    folder, model = saved_unet
    den = diffpress.load(folder)
    assert (den.kind, den.cond_kind, den.sample_shape, den.prediction_type) == (
        "unet2d", "none", (sizes.channels, 8, 8), "epsilon")
    assert den.scheduler_config is None and not den.model.training
    x = torch.randn(2, sizes.channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, 10), model(x, torch.tensor([10, 10])).sample)
    assert diffpress.load(str(folder), prediction_type="v_prediction").prediction_type == "v_prediction"


def test_missing_path_names_the_zoo(tmp_path):
    with pytest.raises(DiffpressError) as info:
        diffpress.load(tmp_path / "nowhere")
    msg = str(info.value)
    assert "no such file or folder" in msg and str(tmp_path / "nowhere") in msg
    assert all(name in msg for name in zoo.DENOISERS)
    assert "config.json" in msg and "model_index.json" in msg


def test_unknown_zoo_like_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffpressError, match="zoo name .*digits-cond-unet"):
        diffpress.load("digits-unet-v2")


def test_file_instead_of_folder(saved_unet):
    with pytest.raises(DiffpressError, match=r"is a file; diffpress loads folders"):
        diffpress.load(saved_unet[0] / WEIGHTS)


def test_folder_that_is_neither(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DiffpressError, match=r"neither a diffusers model folder .* nor a pipeline folder"):
        diffpress.load(tmp_path)


def test_unsupported_architecture_lists_supported_classes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    with pytest.raises(DiffpressError) as info:
        diffpress.load(tmp_path)
    msg = str(info.value)
    assert "AutoencoderKL is not a model family diffpress knows; supported: UNet2DModel" in msg
    for cls in ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel"):
        assert cls in msg


def test_config_without_class_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"in_channels": 3}))
    with pytest.raises(DiffpressError, match="names no _class_name, so diffpress cannot tell the model family"):
        diffpress.load(tmp_path)


def test_invalid_json_config(damaged):
    (damaged / "config.json").write_text("{not json")
    with pytest.raises(DiffpressError, match=r"config.json is not valid JSON"):
        diffpress.load(damaged)


def test_garbage_safetensors(damaged):
    (damaged / WEIGHTS).write_bytes(b"\x00garbage!" * 64)
    with pytest.raises(DiffpressError, match=rf"{WEIGHTS} is corrupt or truncated .*re-download or re-save"):
        diffpress.load(damaged)


@pytest.mark.parametrize("where", ["half", "last_bytes", "header"])
def test_truncated_safetensors(damaged, where):
    """Cut in half, short by a few bytes, or inside the header: all are refused before diffusers sees them."""
    data = (damaged / WEIGHTS).read_bytes()
    cut = {"half": len(data) // 2, "last_bytes": len(data) - 4, "header": 40}[where]
    (damaged / WEIGHTS).write_bytes(data[:cut])
    with pytest.raises(DiffpressError, match=rf"{WEIGHTS} is corrupt or truncated"):
        diffpress.load(damaged)


def test_truncated_weights_inside_a_pipeline(saved_unet, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(saved_unet[0], pipe / "unet")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    assert diffpress.load(pipe).kind == "unet2d"
    data = (pipe / "unet" / WEIGHTS).read_bytes()
    (pipe / "unet" / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffpressError, match="corrupt or truncated"):
        diffpress.load(pipe)


def test_only_a_bin_file(damaged, saved_unet):
    (damaged / WEIGHTS).unlink()
    torch.save(saved_unet[1].state_dict(), damaged / "diffusion_pytorch_model.bin")
    with pytest.raises(DiffpressError) as info:
        diffpress.load(damaged)
    msg = str(info.value)
    assert "no .safetensors weights" in msg and "diffusion_pytorch_model.bin" in msg
    assert "safe_serialization=True" in msg


def test_no_weights_at_all(damaged):
    (damaged / WEIGHTS).unlink()
    with pytest.raises(DiffpressError, match=r"no \.safetensors weights in .*damaged$"):
        diffpress.load(damaged)


def test_weights_that_do_not_fit_the_config(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["out_channels"] = 3
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(DiffpressError, match=r"(?s)could not load UNet2DModel from .*size mismatch for conv_out"):
        diffpress.load(damaged)


def test_missing_tensor_is_an_error(damaged):
    state = load_file(damaged / WEIGHTS)
    del state["conv_out.weight"]
    save_file(state, damaged / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(DiffpressError, match="conv_out.weight"):
        diffpress.load(damaged)


# -- pipeline folders ------------------------------------------------------------------------------
def test_ddim_pipeline_folder(builders, tmp_path, sizes):
    model = builders.unet2d()
    DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=500)).save_pretrained(tmp_path / "pipe")
    den = diffpress.load(tmp_path / "pipe")
    assert den.kind == "unet2d" and den.sample_shape == (sizes.channels, 8, 8)
    assert den.scheduler_config["_class_name"] == "DDIMScheduler"
    assert den.scheduler_config["num_train_timesteps"] == 500
    assert den.prediction_type == "epsilon"
    sched = diffpress.make_scheduler(den, None)
    assert type(sched).__name__ == "DDIMScheduler" and sched.config.num_train_timesteps == 500
    x = torch.randn(2, sizes.channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, 10), model(x, torch.tensor([10, 10])).sample)


def test_prediction_type_comes_from_the_scheduler(builders, tmp_path):
    model = builders.unet2d()
    DDIMPipeline(unet=model, scheduler=DDIMScheduler(prediction_type="v_prediction")).save_pretrained(tmp_path / "v")
    den = diffpress.load(tmp_path / "v")
    assert den.prediction_type == "v_prediction"
    assert diffpress.make_scheduler(den, "euler").config.prediction_type == "v_prediction"
    assert diffpress.load(tmp_path / "v", prediction_type="sample").prediction_type == "sample"

    DDPMPipeline(unet=model, scheduler=DDPMScheduler(prediction_type="sample")).save_pretrained(tmp_path / "s")
    den = diffpress.load(tmp_path / "s")
    assert den.prediction_type == "sample" and den.scheduler_config["_class_name"] == "DDPMScheduler"


def test_pipeline_without_a_denoiser(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(DiffpressError, match="names no 'unet' or 'transformer' component"):
        diffpress.load(tmp_path)


def test_pipeline_with_a_non_scheduler(saved_unet, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(saved_unet[0], pipe / "unet")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (pipe / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(DiffpressError, match="names scheduler 'UNet2DModel', which is not a diffusers scheduler"):
        diffpress.load(pipe)


def test_unsupported_conditioner(saved_unet, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(saved_unet[0], pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"],
                                                       "conditioner": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(DiffpressError, match="unsupported conditioner .*CLIPTextModel.*supported: diffpress Label"):
        diffpress.load(pipe)


def test_compressed_folders_of_the_previous_format_still_load(tmp_path):
    """diffpress.compressed/1 (no packed buffers) loads; /2 is written now (int4 buffers packed)."""
    import json

    import diffpress

    den = diffpress.load("digits-dit")
    diffpress.quantize_(den, diffpress.QuantizeConfig(activations=None), progress=False)
    den.save_pretrained(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "diffpress.json").read_text())
    assert manifest["format"] == "diffpress.compressed/2"
    (tmp_path / "m" / "diffpress.json").write_text(json.dumps({**manifest, "format": "diffpress.compressed/1"}))
    x, t, c = den.example_inputs(2, seed=2)
    with torch.no_grad():
        assert torch.equal(diffpress.load(tmp_path / "m")(x, t, c), den(x, t, c))
