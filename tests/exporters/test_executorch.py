"""ExecuTorch export: literal-scale tracing (no ExecuTorch needed), then lowering tiny models to .pte files with the
XNNPACK backend and running them in the ExecuTorch runtime (the optional extra; CI installs it)."""
import json
import sys

import pytest
import torch

import diffpress
from diffpress import Denoiser, DiffpressError
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.compress.quant import ActQuant, literal_scales
from diffpress.exporters import executorch as et
from diffpress.exporters.plan import rel_rms
from diffpress.recipes.schema import ExportConfig
from diffpress.zoo.models import training_scheduler

needs_et = pytest.mark.skipif(not et.available(), reason="the optional extra 'executorch' is not installed "
                              "(pip install 'diffpress[executorch]'); CI installs it")


@pytest.fixture(scope="module")
def grouped_dit(builders):
    """A tiny class-conditional DiT, W8A8 with two timestep groups (every layer, conv patch embedding included)."""
    den = Denoiser(builders.digits_dit(), scheduler_config=training_scheduler()).eval()
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    q = den.copy()
    quantize_(q, QuantizeConfig(timestep_groups=2, skip_roles=[]), cs, progress=False)
    return den, q


def test_literal_mode_computes_what_evaluate_computes_in_every_timestep_group(grouped_dit):
    _, q = grouped_dit
    (bound,) = et.timestep_bounds(q)
    x, _, cond = q.example_inputs(2)
    with torch.no_grad():
        for group, tv in ((0, bound / 2), (1, (bound + 1000) / 2)):
            t = torch.full((2,), tv)
            ref = q(x, t, cond)
            with literal_scales(q), q.runtime.using(mode="literal", group=group):
                got = q(x, t, cond)
                # the traced graph holds the scales as numbers, int8 activations and no timestep gather
                graph = torch.export.export(et.build_plan(q).graphs[0].module, (x, t, cond), strict=False).graph
            assert torch.equal(got, ref)
            targets = [str(n.target) for n in graph.nodes]
            quant = [n for n in graph.nodes if "quantize_per_tensor" in str(n.target)]
            assert quant and all(isinstance(n.args[1], float) and n.args[-1] == torch.int8 for n in quant)
            assert not any("index_select" in t for t in targets)
    assert all(m.literals is None for m in q.modules() if isinstance(m, ActQuant))  # left as it was
    assert not [n for n, _ in q.named_buffers() if "weight_zero" in n]


@needs_et
def test_w8a8_pte_runs_int8_xnnpack_kernels_one_method_per_timestep_group(grouped_dit, tmp_path):
    den, q = grouped_dit
    spec = et.export_executorch(q, tmp_path / "et")
    assert spec["methods"] == ["model_t0", "model_t1"] and len(spec["timestep_groups"]["bounds"]) == 1
    for method, d in spec["delegation"].items():
        assert d["int8_layers"] >= 8 and d["layers_not_delegated"] == 0, (method, d)
        assert d["ops"]["quantized_decomposed_quantize_per_tensor_default"]["not_delegated"] == 0
    v = spec["verification"]
    assert v["passed"] and v["rel_rms_diff"] <= v["rtol"] == 0.05
    assert {c["method"] for c in v["checks"]} == {"model_t0", "model_t1"}
    on_disk = json.loads((tmp_path / "et" / "io_spec.json").read_text())
    assert on_disk["bytes"] == (tmp_path / "et" / "model.pte").stat().st_size > 0

    # through the program as a Denoiser: batches split to the exported size, each call on its group's method
    pte = et.load_executorch(tmp_path / "et", like=q)
    x, _, cond = q.example_inputs(3, seed=5)
    for tv in (100.0, 900.0):
        t = torch.full((3,), tv)
        with torch.no_grad():
            assert rel_rms(pte(x, t, cond), q(x, t, cond)) < 0.05
    a = diffpress.sample(pte, labels=[1, 2, 3], steps=6, progress=False).images
    b = diffpress.sample(q, labels=[1, 2, 3], steps=6, progress=False).images
    assert rel_rms(a, b) < 0.05


@needs_et
def test_cli_exports_a_float_model_to_pte(builders, tmp_path, capsys):
    from diffpress.cli import main

    den = Denoiser(builders.digits_dit(), scheduler_config=training_scheduler()).eval()
    den.save_pretrained(tmp_path / "model")
    out = ["--format", "executorch", "--out", str(tmp_path / "pte")]
    assert main(["export", str(tmp_path / "model"), *out, "--batch", "1"]) == 0
    assert "ExecuTorch runtime vs PyTorch" in capsys.readouterr().out
    spec = json.loads((tmp_path / "pte" / "io_spec.json").read_text())
    assert spec["methods"] == ["model"] and spec["verification"]["rel_rms_diff"] < 1e-4
    d = spec["delegation"]["model"]
    assert d["int8_layers"] == 0 and d["float_layers_delegated"] >= 10
    before = (tmp_path / "pte" / "model.pte").read_bytes()
    assert main(["export", str(tmp_path / "model"), *out]) == 2  # nothing overwritten without --force
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "model"), *out, "--force", "--opset", "18"]) == 2
    assert "--opset applies to ONNX only" in capsys.readouterr().err
    assert (tmp_path / "pte" / "model.pte").read_bytes() == before


def test_recipe_export_entry_and_a_missing_extra(monkeypatch):
    if et.available():
        assert ExportConfig(format="executorch").dynamic_batch is False
    with pytest.raises(DiffpressError, match="ExecuTorch has no opset"):
        ExportConfig(format="executorch", opset=21)
    for name in ("executorch", "executorch.exir"):  # as if the extra were not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DiffpressError, match=r"diffpress\[executorch\]"):
        ExportConfig(format="executorch")
    assert not et.available()


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.out = torch.nn.Conv2d(2, 1, 1)

    def forward(self, x, t, cond=None):
        return self.out(torch.relu(self.conv(x))) * (t.view(-1, 1, 1, 1) / 1000)


def test_torchscript_warning_names_the_executorch_path(tmp_path):
    from diffpress import export_torchscript

    den = Denoiser(_Toy(), sample_shape=(1, 8, 8), prediction_type="epsilon")
    with pytest.warns(FutureWarning, match="deprecated upstream.*use ExecuTorch.*--format executorch"):
        export_torchscript(den, tmp_path / "ts")


@needs_et
def test_recipe_export_entry_writes_a_verified_pte(tmp_path):
    from diffpress.recipes.runner import _export

    den = Denoiser(_Toy(), sample_shape=(1, 8, 8), prediction_type="epsilon")
    entry = _export("executorch", den, tmp_path / "executorch", ExportConfig(format="executorch", batch=3))
    assert entry["path"] == "executorch/model.pte" and entry["verification"]["passed"]
    assert entry["methods"] == ["model"] and entry["delegation"]["model"]["float_layers_delegated"] == 2
    assert entry["bytes"] >= (tmp_path / "executorch" / "model.pte").stat().st_size > 0
    spec = json.loads((tmp_path / "executorch" / "io_spec.json").read_text())
    assert spec["inputs"][0]["shape"] == [3, 1, 8, 8] and spec["batch"] == 3


@needs_et
def test_4bit_low_rank_model_exports_as_float_arithmetic_with_the_same_numbers(builders, tmp_path):
    from diffpress.compress import LowRankConfig, lowrank_

    den = Denoiser(builders.digits_dit(), scheduler_config=training_scheduler()).eval()
    cs = collect(den, num_samples=4, steps=6, policy=TimestepPolicy("uniform", count=3), progress=False)
    four = dict(weights="int4", group_size=8, activations="int4", act_mode="dynamic", act_group_size=8)
    q = den.copy()
    lowrank_(q, LowRankConfig(rank=4, **four), cs, progress=False)
    quantize_(q, QuantizeConfig(**four, quantize_outputs=False, group_fallback="per_channel"), cs, progress=False)
    spec = et.export_executorch(q, tmp_path / "et")
    d = spec["delegation"]["model"]
    assert d["int8_layers"] == 0 and d["float_layers_delegated"] > 0  # no 4-bit integer kernel: float arithmetic
    assert spec["verification"]["passed"] and spec["verification"]["rel_rms_diff"] < 1e-3
