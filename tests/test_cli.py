import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffpress.cli import main
from diffpress.graph import capture


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_digits_dit):
    """A tiny class-conditional DiT (digits shape) and a copy with noisy weights, as pipeline folders."""
    den = tiny_digits_dit
    root = tmp_path_factory.mktemp("models")
    den.save_pretrained(root / "ref")
    noisy = den.copy()
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    noisy.save_pretrained(root / "noisy")
    return den, root


def test_inspect_json_matches_the_captured_graph(saved_models, capsys):
    den, root = saved_models
    assert main(["inspect", str(root / "ref"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    graph = capture(den)
    assert info["architecture"] == "DiTTransformer2DModel" and info["conditioning"] == "class"
    assert info["num_classes"] == 10 and info["sample_shape"] == [1, 16, 16]
    assert info["macs_per_call"] == graph.macs
    assert [l["name"] for l in info["layers"]] == [l.name for l in graph.layers]
    assert info["params"] == sum(p.numel() for p in den.parameters())


def test_inspect_table(saved_models, capsys):
    _, root = saved_models
    assert main(["inspect", str(root / "ref")]) == 0
    out = capsys.readouterr().out
    assert "MACs per call" in out and "model.pos_embed.proj" in out and "attention" in out


def test_sample_writes_a_grid(saved_models, tmp_path, capsys):
    _, root = saved_models
    out = tmp_path / "g.png"
    assert main(["sample", str(root / "ref"), "--out", str(out), "--num", "12", "--steps", "3",
                 "--columns", "6", "--labels", "0,1,2,3,4,5,6,7,8,9,0,1"]) == 0
    w, h = Image.open(out).size
    assert h == 2 * (16 * 4 + 2) + 2  # two rows of six 64-px tiles
    # existing output without --force: clear error, file untouched
    before = out.read_bytes()
    assert main(["sample", str(root / "ref"), "--out", str(out), "--steps", "3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_eval_self_and_perturbed(saved_models, tmp_path):
    _, root = saved_models
    common = ["--samples", "10", "--steps", "3"]
    assert main(["eval", str(root / "ref"), str(root / "ref"), "--out", str(tmp_path / "self"), *common]) == 0
    same = json.loads((tmp_path / "self" / "report.json").read_text())
    assert same["fidelity"]["identical_samples"] and same["fidelity"]["ssim"] == pytest.approx(1.0)
    assert main(["eval", str(root / "ref"), str(root / "noisy"), "--out", str(tmp_path / "noisy"), *common]) == 0
    noisy = json.loads((tmp_path / "noisy" / "report.json").read_text())
    assert noisy["fidelity"]["psnr_db"] < 40 and noisy["fidelity"]["ssim"] < 0.99
    assert sorted(p.name for p in (tmp_path / "noisy").iterdir()) == ["grid.png", "report.json", "report.md"]


def test_errors_are_clear(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "digits-cond-unet" in err
    assert main(["sample", "digits-unet", "--out", str(tmp_path / "x.png"), "--labels", "a,b"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "diffpress.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("inspect", "sample", "eval", "zoo name"):
        assert word in out.stdout


# -- diffpress run / export / recipes -------------------------------------------------------------------
TINY_RUN = ["--no-progress", "--set", "calibration.samples=2", "--set", "calibration.steps=6",
            "--set", "calibration.policy.count=3", "--set", "evaluation.samples=4", "--set", "evaluation.steps=6",
            "--set", "evaluation.latency_repeats=1", "--set", "exports=[]",
            "--set", "evaluation.metrics=[psnr, ssim, size]"]


@pytest.fixture(scope="module")
def ddim_pipeline(tmp_path_factory):
    """diffusers' own DDIMPipeline around the zoo's digits-unet, with a DDIM scheduler whose timestep spacing
    (trailing) differs from what a DDIM built from the zoo's DDPM config would use (leading)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from diffpress import load

    unet = load("digits-unet").model
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          timestep_spacing="trailing")
    path = tmp_path_factory.mktemp("pipe") / "digits-ddim"
    DDIMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return path, sched


def test_run_on_a_diffusers_pipeline_uses_its_scheduler(ddim_pipeline, tmp_path, capsys):
    from diffpress import TimestepPolicy, load, sample
    from diffpress.eval import Report

    path, sched = ddim_pipeline
    out = tmp_path / "run"
    assert main(["run", "fast", "--model", str(path), "--out", str(out), *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    own = {"requested": "auto", "class": "DDIMScheduler", "from": "checkpoint"}
    assert report["calibration"]["scheduler"] == own and report["evaluation"]["scheduler"] == own
    sched.set_timesteps(6)
    expected = [float(sched.timesteps[i]) for i in TimestepPolicy("uniform", count=3).select(6)]
    assert report["calibration"]["timesteps"] == expected == [999.0, 666.0, 166.0]  # trailing spacing
    assert report["model"]["architecture"] == "UNet2DModel" and report["model"]["source"] == str(path)
    assert f"PSNR {report['headline']['psnr']:.2f} dB" in printed and f"wrote {out}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "model", "recipe.yaml", "report.json", "report.md"]
    reloaded = load(out / "model")
    assert reloaded.scheduler_config["_class_name"] == "DDIMScheduler"
    assert reloaded.scheduler_config["timestep_spacing"] == "trailing"
    # the saved model reproduces the run's samples: its grid (reference / candidate / difference) comes out the same
    kw = dict(num_samples=4, steps=6, scheduler=None, seed=0, progress=False)
    grid = Report({}, sample(load(path), **kw).images, sample(reloaded, **kw).images).save_grid(tmp_path / "g.png")
    assert (np.asarray(Image.open(grid)) == np.asarray(Image.open(out / "grid.png"))).all()

    # existing output without --force: refused before any work, the earlier result untouched
    before = (out / "report.json").read_bytes()
    assert main(["run", "fast", "--model", str(path), "--out", str(out), *TINY_RUN]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before

    # a run's folder exports like a model folder (its model/ is used)
    ts = tmp_path / "ts"
    assert main(["export", str(out), "--format", "torchscript", "--out", str(ts)]) == 0
    assert "compressed model" in capsys.readouterr().out
    spec = json.loads((ts / "io_spec.json").read_text())
    assert spec["verification"]["passed"] and spec["inputs"][0]["shape"] == [2, 1, 16, 16]


def test_run_reuses_a_calibration_file(saved_models, tmp_path, capsys):
    _, root = saved_models
    cal = tmp_path / "cal.safetensors"
    common = ["--model", str(root / "ref"), "--calibration", str(cal), *TINY_RUN]
    assert main(["run", "fast", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["run", "w4a8", "--out", str(tmp_path / "b"), "--set", "passes.0.reconstruct=null", *common]) == 0
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in "ab")
    assert a["calibration"]["source"] == f"collected, saved to {cal}"
    assert b["calibration"]["source"] == f"loaded from {cal}" and b["passes"][0]["config"]["weights"] == "int4"
    assert "calibrate" in b["timings_s"] and b["timings_s"]["calibrate"] < 1
    # a calibration file of another model is refused with what to do
    assert main(["run", "fast", "--model", "digits-unet", "--out", str(tmp_path / "c"), "--calibration", str(cal),
                 *TINY_RUN]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "another --calibration path" in err
    assert not (tmp_path / "c").exists()


def test_run_rejects_bad_input_before_work(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["run", "w9a9", "--out", out]) == 2
    assert "unknown recipe 'w9a9'; built-in recipes: cache-w8a8, cache, fast, prune30-w8a8, prune30, w4a4-lowrank, w4a8-lowrank, w4a8, w8a8" in capsys.readouterr().err
    assert main(["run", "fast", "--model", str(tmp_path / "missing"), "--out", out, "--no-progress"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["run", "fast", "--out", out, "--set", "passes.0.weghts=int4"]) == 2
    assert "--set passes.0.weghts=int4: passes.0.weghts: unknown key (did you mean 'weights'?)" in capsys.readouterr().err
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("version: 1\npasses:\n  - pass: quantize\n    weights: 4\n")
    assert main(["run", str(recipe), "--out", out]) == 2
    assert f"error: {recipe}: passes.0.weights: expected str, got int 4; allowed: int8, int4\n" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_interrupted_leaves_no_output(saved_models, tmp_path, monkeypatch, capsys):
    from diffpress.recipes import runner

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    _, root = saved_models
    monkeypatch.setattr(runner, "evaluate", interrupt)
    assert main(["run", "fast", "--model", str(root / "ref"), "--out", str(tmp_path / "out"), *TINY_RUN]) == 130
    assert "interrupted; the output folder was not written" in capsys.readouterr().err
    # neither the output nor a temporary folder beside it: only the calibration, named, for the same command
    assert [p.name for p in tmp_path.iterdir()] == [runner.resume_file(tmp_path / "out").name]


def test_export_onnx_of_a_model_folder(saved_models, tmp_path, capsys):
    _, root = saved_models
    out = tmp_path / "onnx"
    assert main(["export", str(root / "ref"), "--format", "onnx", "--out", str(out), "--batch", "3"]) == 0
    assert "uncompressed model" in capsys.readouterr().out
    spec = json.loads((out / "io_spec.json").read_text())
    assert spec["opset"] == 21 and spec["verification"]["passed"] and spec["dynamic_batch"]
    assert main(["export", str(root / "ref"), "--format", "onnx", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(root / "ref"), "--format", "torchscript", "--opset", "18",
                 "--out", str(tmp_path / "ts")]) == 2
    assert "--opset applies to ONNX only" in capsys.readouterr().err


def test_recipes_lists_and_resolves(capsys):
    import yaml

    from diffpress.recipes.schema import from_data, load_recipe

    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in ("w8a8", "w4a8", "fast", "w4a4-lowrank", "w4a8-lowrank"):
        assert f"{name:<12}  {load_recipe(name).description}" in listing
    assert main(["recipes", "w4a8", "--set", "passes.0.group_size=32"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["passes"][0]["group_size"] == 32 and resolved["passes"][0]["weights"] == "int4"
    assert from_data(resolved, "stdout") == load_recipe("w4a8", ["passes.0.group_size=32"])
