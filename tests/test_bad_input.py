"""Bad and hostile input through the CLI: every case ends in one `diffpress: error: ...` line (exit code 2) that
names the file, key or value, and leaves nothing on disk."""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from diffpress.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_digits_dit):
    root = tmp_path_factory.mktemp("bad")
    tiny_digits_dit.save_pretrained(root / "ok")
    return root


def _json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _weights(folder: Path, change) -> None:
    f = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))


BIG = "x" * 1_100_000
BOMB = "version: 1\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
# (id, how to break a copy of the model folder or None, recipe text or None, argv with {m} {out} {r}, message)
CASES = [
    ("config-list", lambda m: (m / "transformer" / "config.json").write_text("[1, 2]"), None,
     "sample {m} --out {out}", "config.json holds a JSON list, not an object"),
    ("config-garbage", lambda m: (m / "transformer" / "config.json").write_text("{oops"), None,
     "sample {m} --out {out}", "config.json is not valid JSON"),
    ("index-list", lambda m: (m / "model_index.json").write_text("[]"), None,
     "sample {m} --out {out}", "model_index.json holds a JSON list"),
    ("index-scheduler-text", lambda m: _json(m / "model_index.json", lambda d: {**d, "scheduler": "ddim"}), None,
     "sample {m} --out {out}", "'scheduler' should be [library, class]"),
    ("index-diffpress-list", lambda m: _json(m / "model_index.json", lambda d: {**d, "diffpress": [1]}), None,
     "sample {m} --out {out}", "'diffpress' should be a mapping"),
    ("negative-sample-size",
     lambda m: _json(m / "transformer" / "config.json", lambda d: {**d, "sample_size": -4}), None,
     "sample {m} --out {out}", "is not three positive integers"),
    ("unknown-beta-schedule",
     lambda m: _json(m / "scheduler" / "scheduler_config.json", lambda d: {**d, "beta_schedule": "weird"}), None,
     "sample {m} --out {out}", "rejects this config"),
    ("scheduler-not-a-scheduler",
     lambda m: _json(m / "model_index.json", lambda d: {**d, "scheduler": ["diffusers", "UNet2DModel"]}),
     None, "sample {m} --out {out}", "which is not a diffusers scheduler"),
    ("unsupported-architecture",
     lambda m: _json(m / "transformer" / "config.json", lambda d: {**d, "_class_name": "UVit2DModel"}), None,
     "inspect {m}", "holds a UVit2DModel: UVit2DModel (aMUSEd) is a masked-token generator"),
    ("truncated-weights", lambda m: next((m / "transformer").glob("*.safetensors")).write_bytes(
        next((m / "transformer").glob("*.safetensors")).read_bytes()[:1000]), None,
     "sample {m} --out {out}", "is corrupt or truncated"),
    ("no-weights", lambda m: next((m / "transformer").glob("*.safetensors")).unlink(), None,
     "sample {m} --out {out}", "no .safetensors weights in"),
    ("nan-weights", lambda m: _weights(m, lambda s: s[sorted(s)[0]].view(-1)[0:1].fill_(float("nan"))), None,
     "sample {m} --out {out}", "holds NaN or inf values"),
    ("inf-samples", lambda m: _weights(m, lambda s: s["proj_out_2.weight"].mul_(1e38)), None,
     "sample {m} --out {out} --num 2 --steps 2", "contain NaN or inf"),
    ("num-0", None, None, "sample {m} --out {out} --num 0", "argument --num: must be >= 1, got 0"),
    ("columns-0", None, None, "sample {m} --out {out} --columns 0", "argument --columns: must be >= 1"),
    ("steps-text", None, None, "sample {m} --out {out} --steps many", "argument --steps: expected an integer"),
    ("label-99", None, None, "sample {m} --out {out} --labels 99", "label 99 is out of range"),
    ("label-negative", None, None, "sample {m} --out {out} --labels -1", "label -1 is out of range"),
    ("labels-text", None, None, "sample {m} --out {out} --labels a,b", "--labels takes comma-separated integers"),
    ("out-in-sys", None, None, "sample {m} --out /sys/x.png --num 1 --steps 1", "cannot write /sys/x.png"),
    ("out-in-proc", None, None, "eval {m} {m} --out /proc/diffpress-x --samples 2", "cannot write /proc/diffpress-x"),
    ("missing-model", None, None, "sample {m}/nope --out {out}", "no such file or folder"),
    ("model-is-a-file", lambda m: None, None, "inspect {m}/model_index.json", "is a file; diffpress loads folders"),
    ("recipe-alias-bomb", None, BOMB, "recipes {r}", "expands to more than 50000 values"),
    ("recipe-recursive-alias", None, "version: 1\npasses: &p [{pass: quantize, skip: *p}]\n", "recipes {r}",
     "a recursive alias"),
    ("recipe-deep", None, "version: 1\nx: " + "[" * 40 + "]" * 40 + "\n", "recipes {r}", "nests deeper than 32"),
    ("recipe-huge", None, "version: 1\ndescription: " + BIG + "\n", "recipes {r}", "a recipe is far smaller"),
    ("recipe-python-tag", None, "version: 1\npasses: !!python/object/apply:os.system [echo hi]\n", "recipes {r}",
     "not valid YAML"),
    ("recipe-list", None, "- version: 1\n", "recipes {r}", "a recipe is a mapping"),
    ("recipe-version", None, "version: 7\npasses: [{pass: quantize}]\n", "recipes {r}", "version: 7 is not supported"),
    ("recipe-unknown-key", None, "version: 1\npasses: [{pass: quantize, weigths: int4}]\n", "recipes {r}",
     "passes.0.weigths: unknown key (did you mean 'weights'?)"),
    ("recipe-unknown-pass", None, "version: 1\npasses: [{pass: shrink}]\n", "recipes {r}",
     "passes.0.pass: unknown pass 'shrink'; allowed: prune, lowrank, quantize, cache"),
    ("set-malformed", None, None, "run w8a8 --model {m} --set passes.0.weights", "expected KEY=VALUE"),
    ("set-bad-value", None, None, "run w8a8 --model {m} --set passes.0.weights=int3", "'int3' is not allowed"),
    ("run-model-missing", None, None, "run w8a8 --model {m}/nope", "no such file or folder"),
    ("run-out-unwritable", None, None, "run w8a8 --model {m} --out /proc/diffpress-run", "cannot write"),
    ("export-bad-opset", None, None, "export {m} --format onnx --out {out}x --opset 7", "opset 7 is not supported"),
    ("export-torchscript-opset", None, None, "export {m} --format torchscript --out {out}x --opset 18",
     "--opset applies to ONNX only"),
    ("recipe-very-deep", None, "version: 1\nx: " + "[" * 3000 + "]" * 3000 + "\n", "recipes {r}",
     "nests deeper than 32"),
    ("set-very-deep", None, None, "recipes fast --set x=" + "[" * 3000 + "]" * 3000, "nests deeper than 32"),
    ("config-very-deep", lambda m: (m / "transformer" / "config.json").write_text("[" * 100_000 + "]" * 100_000),
     None, "inspect {m}", "nests too deeply to be a config"),
    ("eval-diverged", lambda m: _weights(m, lambda s: s["proj_out_2.weight"].mul_(1e38)), None,
     "eval {ok} {m} --out {out}x --samples 2 --steps 2", "contain NaN or inf"),
    ("calibration-unwritable", None, None, "run fast --model {m} --calibration /proc/diffpress-cal.safetensors",
     "cannot write /proc/diffpress-cal.safetensors"),
]


@pytest.mark.parametrize("name, breaks, recipe, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_leaves_nothing(name, breaks, recipe, argv, message, base, tmp_path,
                                                         capsys):
    model = base / "ok"
    if breaks is not None:
        model = tmp_path / "model"
        shutil.copytree(base / "ok", model)
        breaks(model)
    work = tmp_path / "work"
    work.mkdir()
    r = work / "recipe.yaml"
    if recipe is not None:
        r.write_text(recipe)
    before = sorted(p for p in tmp_path.rglob("*"))
    args = argv.format(m=model, ok=base / "ok", out=work / "out.png", r=r).split()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffpress: error:"), err
    assert message in last, last
    assert "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind
