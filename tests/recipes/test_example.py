"""examples/compress_digits.py runs end to end (tiny settings) and its outputs hold what it printed."""
import importlib.util
import json
from pathlib import Path

import torch

import diffpress

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "compress_digits.py"


def test_compress_digits_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compress_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(["--model", "digits-dit", "--out", str(tmp_path), "--calib-samples", "2", "--steps", "5",
                       "--eval-samples", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert f"PSNR {res['psnr_db']:.2f} dB" in printed and res["psnr_db"] > 20 and res["onnx_rel_diff"] < 0.05
    assert len(res["timesteps"]) == 5 and res["quantized_layers"] > 0  # the normal policy over 5 steps keeps all 5
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["fidelity"]["psnr_db"] == res["psnr_db"]
    assert json.loads((tmp_path / "onnx" / "io_spec.json").read_text())["quantized"]
    x, t, c = res["model"].example_inputs(2)
    assert torch.equal(diffpress.load(tmp_path / "model")(x, t, c), res["model"](x, t, c))
