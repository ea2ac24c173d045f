"""run_recipe end to end on a tiny digits-shaped DiT: outputs, figures, reload, calibration reuse, interruption."""
import json
from pathlib import Path

import pytest
import torch
import yaml

import diffpress
from diffpress import DiffpressError
from diffpress.recipes import runner
from diffpress.recipes.schema import from_data, load_recipe

TINY = ["calibration.samples=4", "calibration.steps=6", "calibration.policy.count=3", "evaluation.samples=6",
        "evaluation.steps=6", "evaluation.latency_repeats=2", "evaluation.ort_repeats=3"]
NO_EXPORTS = [*TINY, "exports=[]", "evaluation.metrics=[psnr, ssim, size]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_digits_dit):
    root = tmp_path_factory.mktemp("run")
    metrics = "evaluation.metrics=[psnr, ssim, cond_accuracy, fd_real, size, torch_latency, ort_speed]"
    res = diffpress.run_recipe("fast", tiny_digits_dit, root / "out", overrides=[*TINY, metrics],
                               calibration=root / "cal.safetensors", progress=False)
    return res, root


def test_output_folder_holds_the_run(run):
    res, root = run
    out = root / "out"
    assert res.out == out
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "model", "onnx", "recipe.yaml", "report.json",
                                                     "report.md", "torchscript"]
    assert {p.name for p in (out / "onnx").iterdir()} == {"model.onnx", "io_spec.json"}
    assert {p.name for p in (out / "torchscript").iterdir()} == {"model.pt", "io_spec.json"}
    spec = json.loads((out / "onnx" / "io_spec.json").read_text())
    assert spec["quantized"] and spec["opset"] == 21 and spec["dynamic_batch"]
    assert [i["name"] for i in spec["inputs"]] == ["sample", "timestep", "class_labels"]
    # the resolved recipe is the recipe that ran, overrides and defaults included
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["calibration"]["samples"] == 4 and resolved["passes"][0]["act_rule"] == "mse"
    assert from_data(resolved, "recipe.yaml") == res.recipe
    assert not list(root.glob(".out*"))  # no temporary folder left beside it


def test_report_holds_measured_figures(run):
    res, root = run
    data = json.loads((root / "out" / "report.json").read_text())
    ev = res.evaluation.data
    ref, cand = ev["models"]["reference"], ev["models"]["candidate"]
    h = data["headline"]
    assert h["psnr"] == pytest.approx(ev["fidelity"]["psnr_db"]) and 10 < h["psnr"] < 80
    assert h["ssim"] == pytest.approx(ev["fidelity"]["ssim"])
    assert h["cond_accuracy"] == {"uncompressed": ref["cond_accuracy"], "compressed": cand["cond_accuracy"]}
    assert h["size"]["ratio"] == pytest.approx(ref["bytes"] / cand["bytes"]) and h["size"]["ratio"] > 1.05
    sp = data["speed"]
    assert sp["fp32_ms"] > 0 and sp["compressed_ms"] > 0 and sp["speedup"] == pytest.approx(sp["fp32_ms"] / sp["compressed_ms"])
    assert sp["threads"] == 1 and sp["batch"] == 1 and sp["integer_kernels"]  # int8 kernels in ORT's graph
    assert data["size"]["onnx_bytes"] == (root / "out" / "onnx" / "model.onnx").stat().st_size
    assert data["size"]["onnx_fp32_bytes"] > 0
    assert all(e["verification"]["passed"] for e in data["exports"])
    assert data["reload_check"]["identical"]
    assert data["calibration"]["source"] == f"collected, saved to {root / 'cal.safetensors'}"
    assert data["calibration"]["scheduler"] == {"requested": "auto", "class": "DDIMScheduler", "from": "recipe"}
    assert len(data["calibration"]["timesteps"]) == 3 and data["calibration"]["inputs"] == 4 * 2 * 3  # CFG: x2
    q = data["passes"][0]
    assert q["pass"] == "quantize" and q["quantized"] and q["config"]["reconstruct"] is None
    assert {s["reason"] for s in q["skipped"]} >= {"role first (skip_roles)", "role last (skip_roles)"}
    assert set(data["timings_s"]) == {"load", "calibrate", "pass 0: quantize", "evaluate", "export onnx",
                                      "export torchscript", "ort speed"}  # "write" is still running
    md = (root / "out" / "report.md").read_text()
    assert f"PSNR {h['psnr']:.2f} dB" in md and "Speed in ONNX Runtime" in md and "| layer left in float |" in md
    assert "fake-quant simulation" in md
    text = res.summary()
    assert f"PSNR {h['psnr']:.2f} dB" in text and f"({sp['speedup']:.2f}x" in text and f"wrote {root / 'out'}" in text


def test_reloaded_model_reproduces_the_run_exactly(run):
    res, root = run
    reloaded = diffpress.load(root / "out" / "model")
    s = res.evaluation.data["settings"]
    out = diffpress.sample(reloaded, labels=torch.arange(s["num_samples"]) % 10, guidance=s["guidance"],
                           steps=s["steps"], scheduler="ddim", seed=s["seed"], progress=False)
    assert torch.equal(out.images, res.evaluation.candidate_images)
    assert not torch.equal(out.images, res.evaluation.reference_images)  # it is the compressed model


def test_calibration_is_reused_and_checked(run, tiny_digits_dit, perturbed_dit, make_quant_unet, tmp_path):
    res, root = run
    cal = root / "cal.safetensors"
    again = diffpress.run_recipe("fast", tiny_digits_dit, overrides=[*NO_EXPORTS, "passes.0.weights=int4"],
                                 calibration=cal, progress=False)
    assert again.out is None and again["calibration"]["source"] == f"loaded from {cal}"
    assert res.calibration.x is None  # the run streamed its set to the file and read it back lazily
    assert torch.equal(again.calibration.x, torch.cat([x for x, _, _ in res.calibration.batches(10 ** 6)]))
    assert again.recipe.passes[0].config.weights == "int4" and again["passes"][0]["config"]["weights"] == "int4"
    with pytest.raises(DiffpressError, match=r"collected with other settings: steps=6 \(recipe: 5\)"):
        diffpress.run_recipe("fast", tiny_digits_dit, overrides=[*NO_EXPORTS, "calibration.steps=5"],
                             calibration=cal, progress=False)
    with pytest.raises(DiffpressError, match="collected on another model"):
        diffpress.run_recipe("fast", perturbed_dit, overrides=NO_EXPORTS, calibration=cal, progress=False)
    with pytest.raises(DiffpressError, match=r"does not fit this model: it holds samples \(1, 16, 16\)"):
        diffpress.run_recipe("fast", make_quant_unet(), overrides=NO_EXPORTS, calibration=cal, progress=False)


@pytest.fixture
def perturbed_dit(tiny_digits_dit):
    den = tiny_digits_dit.copy()
    with torch.no_grad():
        den.model.proj_out_2.bias.add_(1e-3)
    return den


@pytest.mark.parametrize("stage, exc", [("evaluate", KeyboardInterrupt), ("_export", DiffpressError)])
def test_interrupted_or_failed_run_leaves_nothing(tiny_digits_dit, tmp_path, monkeypatch, stage, exc):
    def boom(*args, **kwargs):
        raise exc("stop")

    monkeypatch.setattr(runner, stage, boom)
    overrides = TINY if stage == "_export" else NO_EXPORTS
    with pytest.raises(exc):
        diffpress.run_recipe("fast", tiny_digits_dit, tmp_path / "out", overrides=overrides, progress=False)
    # no output; only the calibration set is kept, named, for the same command to resume from
    assert [p.name for p in tmp_path.iterdir()] == [runner.resume_file(tmp_path / "out").name]
    # with --force over an earlier result, the earlier result survives an interrupted run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier")
    with pytest.raises(exc):
        diffpress.run_recipe("fast", tiny_digits_dit, tmp_path / "out", overrides=overrides, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [runner.resume_file(tmp_path / "out").name, "out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier"


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_Stages", None)  # nothing may start
    (tmp_path / "out").mkdir()
    with pytest.raises(DiffpressError, match="already exists; pass --force"):
        diffpress.run_recipe("fast", "digits-dit", tmp_path / "out")


def test_samplers_resolve_against_the_checkpoint(tiny_digits_dit):
    from diffusers import DPMSolverMultistepScheduler

    assert runner.resolve_sampler(tiny_digits_dit, "model")[1] == {"requested": "model", "class": "DDPMScheduler",
                                                                  "from": "checkpoint"}
    assert runner.resolve_sampler(tiny_digits_dit, "dpm++")[0] == "dpm++"
    dpm = diffpress.Denoiser(tiny_digits_dit.model, scheduler_config=DPMSolverMultistepScheduler())
    assert runner.resolve_sampler(dpm, "auto") == (None, {"requested": "auto", "class": "DPMSolverMultistepScheduler",
                                                          "from": "checkpoint"})
    assert load_recipe("fast").calibration.sampler == "auto"


def test_ort_speed_runs_a_static_batch_export_at_its_own_batch(tiny_digits_dit, tmp_path):
    from diffpress.exporters import export_onnx
    from diffpress.recipes.runner import ort_speed
    from diffpress.recipes.schema import EvaluationConfig

    export_onnx(tiny_digits_dit, tmp_path / "static", batch=2, dynamic_batch=False)
    speed = ort_speed(tiny_digits_dit, tmp_path / "static" / "model.onnx", tmp_path / "work",
                      EvaluationConfig(ort_repeats=2), opset=21, batch=2)
    assert speed["batch"] == 2 and speed["fp32_ms"] > 0 and speed["compressed_ms"] > 0


def test_default_output_folder_is_one_plain_path_component():
    from diffpress.recipes.runner import default_out

    assert default_out("../../etc/x", "digits-cond-unet") == Path("diffpress-out/_.._etc_x-digits-cond-unet")
    assert default_out("w8a8", "/models/my unet") == Path("diffpress-out/w8a8-my_unet")


def test_an_interrupted_run_resumes_from_its_calibration(tmp_path, monkeypatch, capsys):
    """The calibration of a run that dies later is kept beside the output; the same command reuses it, and
    a completed run leaves nothing of it behind."""
    from diffpress.recipes import runner

    tiny = ["calibration.samples=2", "calibration.steps=4", "calibration.policy.count=2", "evaluation.samples=2",
            "evaluation.steps=3", "evaluation.metrics=[psnr]", "exports=[]"]
    out = tmp_path / "run"
    real = runner.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diffpress.run_recipe("fast", "digits-dit", out=out, overrides=tiny, progress=False)
    kept = runner.resume_file(out)
    assert kept.is_file() and not out.exists() and "the same command reuses it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]  # nothing else left behind
    monkeypatch.setattr(runner, "evaluate", real)
    res = diffpress.run_recipe("fast", "digits-dit", out=out, overrides=tiny, progress=False)
    assert res["calibration"]["source"].startswith("resumed: reused") and not kept.exists()
    # a resume file that does not fit the recipe any more is collected anew, not an error
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(runner, "evaluate", interrupted)
        diffpress.run_recipe("fast", "digits-dit", out=tmp_path / "b", overrides=tiny, progress=False)
    monkeypatch.setattr(runner, "evaluate", real)
    res = diffpress.run_recipe("fast", "digits-dit", out=tmp_path / "b",
                               overrides=[*tiny, "calibration.samples=3"], progress=False)
    assert res["calibration"]["source"].startswith("collected") and not runner.resume_file(tmp_path / "b").exists()


def test_a_plain_module_cannot_be_saved_and_the_run_says_so_before_any_work(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_calibrate", lambda *a, **k: pytest.fail("calibrated a run that cannot be written"))
    with pytest.raises(DiffpressError, match="plain nn.Module, which diffpress cannot save"):
        diffpress.run_recipe("fast", plain, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    # without an output folder nothing needs saving: the same run works
    res = diffpress.run_recipe("fast", plain, None, progress=False, overrides=[
        "calibration.samples=2", "calibration.steps=3", "calibration.policy.count=2", "evaluation.samples=2",
        "evaluation.steps=3", "evaluation.latency_repeats=1", "evaluation.metrics=[psnr]", "exports=[{format: onnx}]"])
    assert res["exports"][0]["verification"]["passed"]
