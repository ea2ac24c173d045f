"""Every model family diffpress adapts, end to end: a tiny random-weight instance built from its diffusers config
and saved as a user would, then ``diffpress run fast --model FOLDER --conditions FILE`` (load, calibrate along
the family's own sampler, quantize W8A8, export ONNX verified in ONNX Runtime, save, reload), and the reload
checked. UVit-like models get the clear refusal."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import diffpress
from diffpress import Denoiser, DiffpressError
from diffpress.cli import main
from diffpress.conditions import ConditionSource, load_file, materialize
from families import FAMILIES, build  # tests/families.py

# a run small enough for CI: 2 calibration trajectories, 2 evaluation samples, ONNX only. These models have
# random weights, which amplify the odd one-step rounding difference between ONNX Runtime's integer
# kernels and the simulation far more than trained ones (measured up to 7.7 % on the SD-style UNet, against
# 0.1-0.4 % on the trained zoo models); the float export below is held to 1e-4.
TINY = ["calibration.samples=2", "calibration.steps=4", "calibration.policy.count=2", "evaluation.samples=2",
        "evaluation.steps=3", "evaluation.latency_repeats=1", "evaluation.metrics=[psnr, ssim]",
        "exports=[{format: onnx, rtol: 0.2}]"]
FLOW = {"sd3", "flux", "sana", "auraflow"}


def _save(family: str, folder):
    """The model's folder as a user has it: ``save_pretrained`` of the diffusers model. Flux's config has no
    sample size, so its folder is a diffpress pipeline folder that records the latent shape."""
    model = build(family)
    if family == "flux":
        Denoiser(model, sample_shape=(4, 16, 16)).save_pretrained(folder)
    else:
        model.save_pretrained(folder)
    return diffpress.load(folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_compresses_every_family_with_conditions_from_a_file(family, tmp_path):
    den = _save(family, tmp_path / "model")
    assert den.kind == ("unet2d_condition" if family in ("sd", "sdxl") else family)
    assert (den.prediction_type == "flow") == (family in FLOW)
    args = ["run", "fast", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--no-progress"]
    if den.cond_kind == "hidden_states":  # text families: embeddings from a file (random values, real shapes)
        cond = den.example_cond(3, seed=7)
        parts = cond if isinstance(cond, dict) else {den.cond_names[0]: cond}
        fixed = {k for k, p in den.parts.items() if p.fill is not None}  # sizes / masks may be left out
        save_file({k: v.contiguous() for k, v in parts.items() if k not in fixed}, str(tmp_path / "cond.safetensors"))
        args += ["--conditions", str(tmp_path / "cond.safetensors")]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    spec = json.loads((tmp_path / "out" / "onnx" / "io_spec.json").read_text())
    assert spec["verification"]["passed"] and spec["verification"]["rel_rms_diff"] <= spec["verification"]["rtol"]
    assert [i["name"] for i in spec["inputs"]] == ["sample", "timestep", *den.cond_names]
    assert spec["target"]["name"] == "any" and spec["prediction_type"] == den.prediction_type
    if den.cond_kind == "hidden_states":
        assert report["calibration"]["meta"]["conditions"]["kind"] == "file"
    # the family's call, conditioning inputs and packing export exactly in float
    fp32 = diffpress.export_onnx(den, tmp_path / "fp32")
    assert fp32.verification["passed"] and fp32.verification["rtol"] == 1e-4
    # the saved model reloads to the same function
    loaded = diffpress.load(tmp_path / "out" / "model")
    x, t, c = loaded.example_inputs(2, seed=3)
    q = diffpress.load(tmp_path / "out" / "model")
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c), q(x, t, c))
    assert loaded.compression and loaded.compression[0]["pass"] == "quantize"


def test_the_null_and_random_condition_sources(tmp_path):
    den = _save("sd3", tmp_path / "model")
    for kind in ("null", "random"):
        kw, note = materialize(den, ConditionSource(kind), 3)
        assert set(kw["cond"]) == {"encoder_hidden_states", "pooled_projections"} and note
        assert kw["cond"]["pooled_projections"].shape == (3, 24)
    assert float(kw["cond"]["encoder_hidden_states"].abs().sum()) > 0  # random, labelled as such by the note
    with pytest.raises(DiffpressError, match="pooled_projections"):
        save_file({"encoder_hidden_states": torch.zeros(2, 333, 32)}, str(tmp_path / "half.safetensors"))
        load_file(den, tmp_path / "half.safetensors", 2)
    with pytest.raises(DiffpressError, match=r"per-sample shape \(333, 16\); this model takes \(333, 32\)"):
        save_file({"encoder_hidden_states": torch.zeros(2, 333, 16), "pooled_projections": torch.zeros(2, 24)},
                  str(tmp_path / "bad.safetensors"))
        load_file(den, tmp_path / "bad.safetensors", 2)


def test_sdxl_null_condition_keeps_the_size_ids():
    den = Denoiser(build("sdxl"))
    cond = den.example_cond(2)
    null = den.null_cond(2, like=cond)
    assert torch.equal(null["time_ids"], cond["time_ids"]) and not null["text_embeds"].any()
    assert cond["time_ids"][0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]  # 16x16 latent, an 8x VAE


def test_uvit_is_refused_with_the_reason(tmp_path, capsys):
    from diffusers import UVit2DModel

    model = UVit2DModel(hidden_size=16, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                        encoder_hidden_size=8, vocab_size=12, codebook_size=8, in_channels=8, block_out_channels=8,
                        num_res_blocks=1, block_num_heads=1, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=16, sample_size=4)
    with pytest.raises(DiffpressError, match="masked-token generator"):
        Denoiser(model)
    model.save_pretrained(tmp_path / "uvit")
    assert main(["inspect", str(tmp_path / "uvit")]) == 2
    assert "not the noise / velocity of a Gaussian denoiser" in capsys.readouterr().err


def test_a_diffusers_family_without_adapter_names_the_supported_ones():
    from diffusers import AutoencoderKL

    with pytest.raises(DiffpressError, match="AutoencoderKL is not a model family diffpress knows; supported: "
                                             "UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel"):
        Denoiser(AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2))


def test_a_user_adapter_drives_a_new_family(tmp_path):
    from diffusers import ModelMixin, ConfigMixin
    from diffusers.configuration_utils import register_to_config
    from diffpress.adapters import Adapter, Part, register

    class TinyTextDenoiser(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, channels: int = 2, side: int = 8, text_dim: int = 6):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
            self.text = torch.nn.Linear(text_dim, channels)

        def forward(self, latents, sigma, text):
            return self.conv(latents) * sigma[:, None, None, None] / 1000 + self.text(text.mean(1))[:, :, None, None]

    class TinyAdapter(Adapter):
        name = "tiny-text"
        classes = ("TinyTextDenoiser",)

        def model_class(self, class_name):
            return TinyTextDenoiser

        def sample_shape(self, model):
            return (model.config.channels, model.config.side, model.config.side)

        def parts(self, model, sample_shape):
            return {"text": Part((5, model.config.text_dim))}

        def forward(self, model, x, t, cond):
            return model(x, t.float(), cond)

    register(TinyAdapter())
    den = Denoiser(TinyTextDenoiser())
    assert (den.kind, den.cond_shape, den.cond_names) == ("tiny-text", (5, 6), ["text"])
    den.save_pretrained(tmp_path / "m")
    again = diffpress.load(tmp_path / "m")
    x, t, c = den.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(again(x, t, c), den(x, t, c))
    res = diffpress.export_onnx(den, tmp_path / "onnx")
    assert res.verification["passed"] and [i["name"] for i in res.spec["inputs"]] == ["sample", "timestep", "text"]


def test_cli_sample_and_eval_take_conditions_for_a_flow_model(tmp_path):
    den = _save("sd3", tmp_path / "model")
    save_file({k: v.contiguous() for k, v in den.example_cond(2, seed=3).items()}, str(tmp_path / "cond.safetensors"))
    common = ["--steps", "2", "--conditions", str(tmp_path / "cond.safetensors")]
    assert main(["sample", str(tmp_path / "model"), "--out", str(tmp_path / "grid.png"), "--num", "3", *common]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["eval", str(tmp_path / "model"), str(tmp_path / "model"), "--out", str(tmp_path / "eval"),
                 "--samples", "2", *common]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["fidelity"]["identical_samples"]
    assert main(["sample", str(tmp_path / "model"), "--out", str(tmp_path / "g2.png"), "--steps", "2",
                 "--scheduler", "ddim"]) == 2  # a DDPM-family sampler on a flow model, and no conditions
