import json

import numpy as np
import pytest
from PIL import Image

from diffpress.eval import evaluate

FAST = dict(num_samples=12, steps=4, latency_repeats=2, progress=False)


def test_model_against_itself(tiny_digits_dit, tmp_path):
    rep = evaluate(tiny_digits_dit, tiny_digits_dit, **FAST)
    fid = rep["fidelity"]
    assert fid["psnr_db"] is None and fid["identical_samples"] is True
    assert fid["ssim"] == pytest.approx(1.0) and fid["max_abs_diff"] == 0.0
    ref, cand = rep["models"]["reference"], rep["models"]["candidate"]
    for key in ("params", "bytes", "macs_per_call", "macs_per_sample", "fd_real", "cond_accuracy"):
        assert ref[key] == cand[key], key
    assert ref["macs_per_sample"] == ref["macs_per_call"] * 8  # 4 steps, doubled by guidance
    assert ref["bytes"] > 4 * ref["params"]  # fp32 weights plus the safetensors header
    rep.save(tmp_path / "r")
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["fidelity"]["identical_samples"] is True
    assert "inf (identical samples)" in (tmp_path / "r" / "report.md").read_text()


def test_perturbed_copy_reports_a_loss_and_the_grid_shows_it(tiny_digits_dit, perturbed, tmp_path):
    rep = evaluate(tiny_digits_dit, perturbed(tiny_digits_dit, 0.05), **FAST)
    fid = rep["fidelity"]
    assert fid["psnr_db"] is not None and fid["psnr_db"] < 40
    assert fid["ssim"] < 0.99
    assert rep["models"]["candidate"]["fd_real"] != rep["models"]["reference"]["fd_real"]
    rep.save(tmp_path / "r")
    grid = np.asarray(Image.open(tmp_path / "r" / "grid.png").convert("L"), dtype=np.float64)
    rows = np.array_split(grid, 3, axis=0)  # reference, candidate, |diff|; tiles on a white background
    assert grid.shape[0] == 3 * (16 * 4 + 2) + 2
    ref_row, cand_row = rows[0], rows[1]
    assert np.abs(ref_row - cand_row).mean() > 1.0  # the candidate row visibly differs


def test_save_refuses_existing_output(tiny_digits_dit, tmp_path):
    from diffpress import DiffpressError

    rep = evaluate(tiny_digits_dit, tiny_digits_dit, **FAST)
    (tmp_path / "r").mkdir()
    with pytest.raises(DiffpressError, match="--force"):
        rep.save(tmp_path / "r")
    rep.save(tmp_path / "r", force=True)
    assert (tmp_path / "r" / "grid.png").exists()
