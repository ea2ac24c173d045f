"""diffpress.deploy: an ONNX export folder's whole sampling loop in ONNX Runtime matches diffpress.sample on the same
seeds (within the export tolerance), with guidance and batching; the CLI writes a grid from an export folder."""
from __future__ import annotations

import json

import pytest
from PIL import Image

import diffpress
from diffpress.cli import main
from diffpress.deploy import OrtDenoiser, loop_timer, sample
from diffpress.errors import DiffpressError
from diffpress.eval.metrics import psnr


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    from diffpress.calibration import TimestepPolicy, collect
    from diffpress.compress import QuantizeConfig, quantize_

    den = diffpress.load("digits-dit")
    cs = collect(den, num_samples=4, steps=10, policy=TimestepPolicy("uniform", count=3), progress=False)
    quantize_(den, QuantizeConfig(), cs, progress=False)
    folder = tmp_path_factory.mktemp("deploy") / "onnx"
    diffpress.export_onnx(den, folder)
    return den, folder


def test_quantized_loop_matches_pytorch(w8a8):
    den, folder = w8a8
    kw = dict(labels=[0, 3, 5, 9, 2], steps=8, guidance=3.0, seed=11, progress=False)
    ref = diffpress.sample(den, **kw).images
    ort = OrtDenoiser(folder, threads=1)
    got = sample(ort, batch_size=2, **kw).images  # batching does not change a sample (per-sample seeds)
    assert got.shape == ref.shape == (5, 1, 16, 16)
    # int8 kernels requantize in fixed point: the loop stays within what the export check allows per call
    assert psnr(ref, got) > 30
    assert ort.timing["runs"] == 8 * 3 and ort.timing["seconds"] > 0
    spec = json.loads((folder / "io_spec.json").read_text())
    assert spec["num_classes"] == 10 and spec["auto_sampler"] == "ddim"


def test_loop_timer_and_unconditional(w8a8):
    _, folder = w8a8
    run = loop_timer(folder, steps=3, threads=1, guidance=1.0)
    out = run()
    assert out.images.shape == (1, 1, 16, 16) and run.denoiser.timing["runs"] == 3


def test_cli_sample_from_export_folder(w8a8, tmp_path, capsys):
    _, folder = w8a8
    png = tmp_path / "grid.png"
    assert main(["sample", str(folder), "--out", str(png), "--num", "4", "--steps", "4", "--threads", "1"]) == 0
    assert Image.open(png).size[0] > 16 and "4 samples" in capsys.readouterr().out


def test_not_an_export_folder(tmp_path):
    with pytest.raises(DiffpressError, match="not a diffpress export folder"):
        OrtDenoiser(tmp_path)
    ts = tmp_path / "ts"
    diffpress.export_torchscript(diffpress.load("digits-dit"), ts)
    with pytest.raises(DiffpressError, match="deploy runs ONNX exports"):
        OrtDenoiser(ts)
