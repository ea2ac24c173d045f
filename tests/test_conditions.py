"""Conditions for calibration and evaluation: prompts encoded by a pipeline's own text encoders (a tiny SD and
SDXL pipeline built offline: CLIP text encoders from configs, a character-level CLIP tokenizer)."""
from __future__ import annotations

import json
import string

import pytest
import torch

import diffpress
from diffpress import DiffpressError
from diffpress.cli import main
from diffpress.conditions import ConditionSource, encode_prompts, materialize

transformers = pytest.importorskip("transformers", reason="prompt encoding needs the prompts extra (transformers)")

SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)


def _tokenizer(folder):
    """A character-level CLIP tokenizer (no merges): every letter is a token, as CLIP's BPE starts out."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    tok.save_pretrained(folder)
    return len(vocab)


def _text_encoder(cls, vocab: int, hidden: int, projection: int = 24):
    config = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(1)
    return cls(config).eval()


def _pipeline(root, xl: bool = False):
    """A diffusers pipeline folder as it is published: model_index.json, unet, scheduler, text encoder(s)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = dict(SD_UNET)
    if xl:
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=8 * 6 + 24)
    UNet2DConditionModel(**unet).save_pretrained(root / "unet")
    DDIMScheduler(clip_sample=False).save_pretrained(root / "scheduler")
    vocab = _tokenizer(root / "tokenizer")
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if xl:  # two encoders whose hidden states concatenate to 32; the second's projection is the pooled 24
        _text_encoder(transformers.CLIPTextModel, vocab, 16).save_pretrained(root / "text_encoder")
        _tokenizer(root / "tokenizer_2")
        _text_encoder(transformers.CLIPTextModelWithProjection, vocab, 16).save_pretrained(root / "text_encoder_2")
        index.update(tokenizer_2=["transformers", "CLIPTokenizer"],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"], force_zeros_for_empty_prompt=True)
    else:
        _text_encoder(transformers.CLIPTextModel, vocab, 32).save_pretrained(root / "text_encoder")
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_sd_prompts_are_encoded_as_the_pipeline_does(tmp_path):
    pipe = _pipeline(tmp_path / "sd")
    den = diffpress.load(pipe)
    cond, uncond = encode_prompts(den, pipe, ["a red cat", "two dogs"])
    assert cond.shape == (2, 77, 32) and uncond.shape == (2, 77, 32)
    assert not torch.allclose(cond[0], cond[1])  # different prompts, different states
    torch.testing.assert_close(uncond[0], uncond[1])  # the empty prompt's encoding, not zeros
    assert float(uncond.abs().sum()) > 0
    (tmp_path / "prompts.txt").write_text("a red cat\n\ntwo dogs\n")
    kw, note = materialize(den, ConditionSource("prompts", str(tmp_path / "prompts.txt"), str(pipe)), 5)
    assert kw["cond"].shape == (5, 77, 32) and torch.equal(kw["cond"][2], kw["cond"][0]) and note is None


def test_sdxl_prompts_carry_pooled_embeddings_and_size_ids(tmp_path):
    pipe = _pipeline(tmp_path / "xl", xl=True)
    den = diffpress.load(pipe)
    cond, uncond = encode_prompts(den, pipe, ["a red cat"])
    assert {k: tuple(v.shape) for k, v in cond.items()} == {
        "encoder_hidden_states": (1, 77, 32), "text_embeds": (1, 24), "time_ids": (1, 6)}
    assert not uncond["encoder_hidden_states"].any()  # force_zeros_for_empty_prompt, as the pipeline does
    assert cond["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]


def test_cli_run_with_prompts(tmp_path):
    pipe = _pipeline(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red cat\ntwo dogs\n")
    args = ["run", "fast", "--model", str(pipe), "--prompts", str(tmp_path / "prompts.txt"), "--out",
            str(tmp_path / "out"), "--no-progress"]
    for item in ["calibration.samples=2", "calibration.steps=3", "calibration.policy.count=2", "evaluation.samples=2",
                 "evaluation.steps=3", "evaluation.latency_repeats=1", "evaluation.metrics=[psnr]", "exports=[]"]:
        args += ["--set", item]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["meta"]["conditions"] == {"kind": "prompts", "path": str(tmp_path / "prompts.txt"),
                                                           "pipeline": str(pipe)}


def test_bad_prompt_sources_are_clear_errors(tmp_path):
    with pytest.raises(DiffpressError, match="needs path .* and pipeline"):
        ConditionSource("prompts", path="p.txt")
    den = diffpress.load("digits-dit")
    (tmp_path / "p.txt").write_text("\n \n")
    with pytest.raises(DiffpressError, match="holds no prompts"):
        materialize(den, ConditionSource("prompts", str(tmp_path / "p.txt"), str(tmp_path)), 2)
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(DiffpressError, match="not a diffusers pipeline folder"):
        encode_prompts(den, tmp_path, ["a cat"])



def _t5_tokenizer(folder):
    """A character-level T5 tokenizer (a unigram vocabulary of single characters), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -1.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                 extra_ids=0).save_pretrained(folder)
    return len(vocab)


def test_flux_prompts_use_clip_pooled_and_t5_states(tmp_path):
    """FLUX.1's pipeline: CLIP's pooled output and T5's 512 token states; no null (guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from families import build

    root = tmp_path / "flux"
    diffpress.Denoiser(build("flux"), sample_shape=(4, 16, 16)).model.save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    vocab = _tokenizer(root / "tokenizer")
    _text_encoder(transformers.CLIPTextModel, vocab, 24).save_pretrained(root / "text_encoder")  # pooled: 24
    t5_vocab = _t5_tokenizer(root / "tokenizer_2")
    torch.manual_seed(2)
    transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0,
        eos_token_id=1)).eval().save_pretrained(root / "text_encoder_2")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    den = diffpress.Denoiser(build("flux"), sample_shape=(4, 16, 16))
    cond, uncond = encode_prompts(den, root, ["a red cat", "two dogs"])
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 512, 32),
                                                           "pooled_projections": (2, 24)}
    assert uncond is None and den.default_guidance == 1.0
    assert not torch.allclose(cond["pooled_projections"][0], cond["pooled_projections"][1])
    with torch.no_grad():
        assert torch.isfinite(den(*den.example_inputs(2)[:2], cond)).all()


def test_sd3_prompts_use_both_clips_and_the_pipelines_t5_padding(tmp_path):
    """SD3's pipeline: two CLIP encoders (hidden states side by side, pooled outputs concatenated) and 256 T5
    tokens (zeros when the pipeline has no T5 encoder): 77 + 256 = 333 tokens; the empty prompt as the null."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from families import build

    root = tmp_path / "sd3"
    build("sd3").save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    vocab = _tokenizer(root / "tokenizer")
    _tokenizer(root / "tokenizer_2")
    for name in ("text_encoder", "text_encoder_2"):  # hidden 16 + 16 = 32 states, pooled 12 + 12 = 24
        _text_encoder(transformers.CLIPTextModelWithProjection, vocab, 16, projection=12).save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_3": [None, None], "text_encoder_3": [None, None]}))
    den = diffpress.load(root)
    cond, uncond = encode_prompts(den, root, ["a red cat"])
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (1, 333, 32),
                                                           "pooled_projections": (1, 24)}
    assert not cond["encoder_hidden_states"][0, 77:].any()  # no T5 encoder: the pipeline pads with zeros
    assert float(uncond["pooled_projections"].abs().sum()) > 0  # the empty prompt's encoding, not zeros
