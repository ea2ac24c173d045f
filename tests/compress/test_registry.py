"""The one pass registry: a third-party pass (registered from its own module, found through an entry point)
rewrites layers, saves, reloads in a fresh process, exports to ONNX and TorchScript with two graphs and a
file, and is verified at its declared tolerance; the rest of diffpress asks the registry, never a pass name."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import diffpress
from diffpress.compress import registry
from diffpress.errors import DiffpressError
from diffpress.exporters import export_onnx, export_torchscript
from diffpress.exporters.plan import build_plan

PLUGIN = Path(__file__).parent / "plugin" / "diffpress_split_plugin.py.txt"
PACKAGE = Path(diffpress.__file__).parent


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The plugin installed as a package would be: its module and a dist-info with the entry point."""
    root = tmp_path_factory.mktemp("site")
    (root / "diffpress_split_plugin.py").write_text(PLUGIN.read_text())
    info = root / "diffpress_split_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffpress-split-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffpress.passes]\nsplit_linear = diffpress_split_plugin\n")
    return root


@pytest.fixture
def plugin(plugin_dir, monkeypatch):
    """The pass found by name through its entry point (as diffpress.load would), removed afterwards."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delitem(registry.PASSES, "split_linear", raising=False)
    spec = registry.get("split_linear")  # imports the module through the entry point
    yield sys.modules["diffpress_split_plugin"], spec
    registry.PASSES.pop("split_linear", None)
    sys.modules.pop("diffpress_split_plugin", None)


@pytest.fixture
def split_dit(plugin):
    module, spec = plugin
    den = diffpress.load("digits-dit")
    split = den.copy()
    report = spec.apply(split, spec.config(layers=["*attn1.to_q", "*ff.net.2"]), None, False)
    return den, split, report


def test_a_registered_pass_really_rewrites_layers(split_dit, plugin):
    module, spec = plugin
    den, split, report = split_dit
    assert len(report.split) == 8  # 4 blocks x (to_q, ff.net.2)
    assert isinstance(split.get_submodule(report.split[0]), module.SplitLinear)
    assert {s["reason"] for s in report.skipped} >= {"not selected"}
    x, t, c = den.example_inputs(3, seed=1)
    with torch.no_grad():
        assert torch.allclose(split(x, t, c), den(x, t, c), atol=1e-5)
    assert spec.description.startswith("split") and not spec.simulated and spec.export_rtol == 1e-4


def test_saved_model_reloads_in_a_fresh_process_with_only_import_diffpress(split_dit, plugin_dir, tmp_path):
    den, split, _ = split_dit
    split.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "diffpress.json").read_text())["passes"][0]["pass"] == "split_linear"
    x, t, c = den.example_inputs(2, seed=4)
    with torch.no_grad():
        ref = split(x, t, c)
    torch.save({"x": x, "t": t, "c": c, "ref": ref}, tmp_path / "io.pt")
    code = ("import torch, diffpress;"
            f"d = torch.load(r'{tmp_path / 'io.pt'}', weights_only=True);"
            f"m = diffpress.load(r'{tmp_path / 'model'}');"
            "print(type(m.get_submodule('model.transformer_blocks.0.attn1.to_q')).__name__,"
            " float((m(d['x'], d['t'], d['c']) - d['ref']).abs().max()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    name, diff = run.stdout.split()
    assert name == "SplitLinear" and float(diff) == 0.0


def test_export_plan_with_two_graphs_and_a_file_in_onnx_and_torchscript(split_dit, tmp_path):
    _, split, report = split_dit
    plan = build_plan(split)
    assert [g.name for g in plan.graphs] == ["model", "split_layer"] and list(plan.files) == ["split.json"]
    assert plan.rtol == 1e-4 and plan.required_ops == [("split_linear", ("Concat",))] and not plan.simulated
    res = export_onnx(split, tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["io_spec.json", "model.onnx", "split.json",
                                                                     "split_layer.onnx"]
    spec = json.loads((tmp_path / "onnx" / "io_spec.json").read_text())
    assert [g["name"] for g in spec["graphs"]] == ["model", "split_layer"]
    assert spec["graphs"][1]["inputs"] == [{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]
    assert spec["passes"] == ["split_linear"] and spec["files"] == ["split.json"]
    assert res.verification["rtol"] == 1e-4 and res.verification["passed"]
    assert {c["graph"] for c in res.verification["checks"]} == {"model", "split_layer"}
    assert all(c["rel_rms_diff"] < 1e-5 for c in res.verification["checks"])
    assert "QuantizeLinear" not in res.op_types and res.op_types["Concat"] >= 8
    assert json.loads((tmp_path / "onnx" / "split.json").read_text()) == report.split
    layer = onnx.load(str(tmp_path / "onnx" / "split_layer.onnx"))
    assert [i.name for i in layer.graph.input] == ["x"] and [o.name for o in layer.graph.output] == ["y"]
    with pytest.warns(FutureWarning):
        ts = export_torchscript(split, tmp_path / "ts")
    assert ts["verification"]["passed"] and [g["file"] for g in ts["graphs"]] == ["model.pt", "split_layer.pt"]
    assert (tmp_path / "ts" / "split.json").exists()


def test_passes_compose_and_the_loosest_tolerance_applies(split_dit, tmp_path):
    den, split, _ = split_dit
    cs = diffpress.calibrate(den, num_samples=2, steps=4, policy=diffpress.TimestepPolicy("uniform", count=2),
                             progress=False)
    diffpress.quantize_(split, diffpress.QuantizeConfig(skip=["*.a", "*.b"]), cs, progress=False)
    assert [r["pass"] for r in split.compression] == ["split_linear", "quantize"]
    assert registry.export_rtol(split.compression) == 5e-2 and registry.simulation_notes(split.compression)
    split.save_pretrained(tmp_path / "m")
    back = diffpress.load(tmp_path / "m")
    x, t, c = den.example_inputs(2, seed=5)
    with torch.no_grad():
        assert torch.equal(back(x, t, c), split(x, t, c))
    res = export_onnx(split, tmp_path / "onnx")
    assert res.verification["rtol"] == 5e-2 and res.op_types["QuantizeLinear"] > 0 and res.op_types["Concat"] >= 8


def test_a_recipe_can_name_a_registered_pass(plugin):
    from diffpress.recipes.schema import from_data

    r = from_data({"version": 1, "passes": [{"pass": "split_linear", "layers": ["*to_q"]}, {"pass": "quantize"}],
                   "exports": [{"format": "onnx"}]}, "inline")
    assert r.passes[0].config.layers == ["*to_q"] and r.passes[0].spec.name == "split_linear"
    with pytest.raises(DiffpressError, match="passes.1: split_linear may run once per recipe"):
        from_data({"version": 1, "passes": [{"pass": "split_linear"}, {"pass": "split_linear"}],
                   "exports": [{"format": "onnx"}]}, "inline")


def test_unknown_pass_in_a_saved_model_names_what_is_known(tmp_path):
    with pytest.raises(DiffpressError, match="unknown pass 'nope'; this diffpress knows: prune, lowrank, quantize, cache"):
        registry.get("nope")
    with pytest.raises(DiffpressError, match="passes.0 is not a pass record"):
        registry.restore(diffpress.load("digits-dit"), [["quantize"]])


# -- the architecture holds: checked on the source ------------------------------------------------------
def _modules(*parts: str) -> list[Path]:
    paths = []
    for part in parts:
        p = PACKAGE / part
        paths += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return paths


def _code_strings(path: Path) -> set[str]:
    """String constants of a module, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_no_pass_name_outside_the_registry():
    for path in _modules("recipes", "exporters", "eval", "loading.py"):
        named = _code_strings(path) & set(registry.names())
        assert not named, f"{path.relative_to(PACKAGE)} names pass {named}"


def test_no_module_imports_the_package_face_and_exporters_import_nothing_private_from_compress():
    for path in _modules("."):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.module == "diffpress"), \
                f"{path}: from diffpress import ..."
            if isinstance(node, ast.Import):
                assert all(a.name != "diffpress" for a in node.names), f"{path}: import diffpress"
            if path.parent.name == "exporters" and isinstance(node, ast.ImportFrom) and \
                    (node.module or "").startswith("diffpress.compress"):
                assert not any(a.name.startswith("_") for a in node.names) and \
                    not any(part.startswith("_") for part in node.module.split(".")), f"{path}: {node.module}"


def test_a_broken_plugin_or_a_taken_name_is_a_clear_error(plugin_dir, tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    (root / "broken_plugin.py").write_text("raise ImportError('missing dependency foo')\n")
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffpress.passes]\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(DiffpressError, match="entry point 'broken_plugin', which failed to import .*missing dependency"):
        registry.get("broken")
    quantize = registry.get("quantize")
    with pytest.raises(DiffpressError, match="a pass named 'quantize' is already registered"):
        registry.register(registry.PassSpec("quantize", quantize.config, quantize.apply))
    assert registry.get("quantize") is quantize
