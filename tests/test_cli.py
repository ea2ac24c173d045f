import json
import subprocess
import sys

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
