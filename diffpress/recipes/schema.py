"""Recipes: the compression flow written down as versioned YAML, checked against the config dataclasses.

A recipe has four sections, each a dataclass whose fields are the allowed keys: ``calibration``
(:class:`CalibrationConfig`), ``passes`` (a list of ``{pass: NAME, ...}`` entries, each checked against
its pass's config, e.g. :class:`diffpress.QuantizeConfig`), ``exports`` (:class:`ExportConfig`) and
``evaluation`` (:class:`EvaluationConfig`). Keys left out take the dataclass defaults; the resolved
recipe (every default filled in) is what a run writes next to its results.

>>> r = load_recipe("fast", overrides=["passes.0.weights=int4", "evaluation.samples=20"])
>>> r.passes[0].config.weights, r.passes[0].config.reconstruct, r.evaluation.samples
('int4', None, 20)
>>> load_recipe("fast", overrides=["passes.0.weghts=int4"])
Traceback (most recent call last):
...
diffpress.recipes.validate.RecipeError: --set passes.0.weghts=int4: passes.0.weghts: unknown key (did you mean 'weights'?); allowed: pass, weights, ...
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from diffpress.calibration.policies import TimestepPolicy
from diffpress.conditions import ConditionSource
from diffpress.errors import DiffpressError, check_allowed, check_at_least
from diffpress.compress import registry
from diffpress.recipes.passes import PassStep, check_order
from diffpress.recipes.validate import RecipeError, Where, build, load_yaml, show_value, to_data
from diffpress.schedulers import SCHEDULERS

VERSION = 1
BUILTIN_DIR = Path(__file__).parent
# "auto": the checkpoint's own sampler unless it is a training schedule (DDPM) or missing, then DDIM;
# "model" or null: the checkpoint's own scheduler, whatever it is; a name: that sampler (with the
# checkpoint's noise schedule)
SAMPLERS = ("auto", "model", None, *SCHEDULERS)
METRICS = ("psnr", "ssim", "cond_accuracy", "fd_real", "size", "torch_latency", "ort_speed")
FORMATS = ("onnx", "torchscript", "executorch")


@dataclass
class CalibrationConfig:
    """How calibration data is collected: the arguments of :func:`diffpress.calibrate`.

    ``samples`` trajectories of ``steps`` steps, seeds ``seed, seed+1, ...``; ``policy`` picks the steps
    kept; ``conditions`` where the conditions come from (:class:`diffpress.conditions.ConditionSource`). ``sampler``: ``auto`` (the checkpoint's sampler, DDIM when it ships a DDPM training schedule
    or none), ``model``/null (the checkpoint's scheduler as it is) or a sampler name.
    """

    sampler: str | None = "auto"
    steps: int = 50
    samples: int = 64
    policy: TimestepPolicy = field(default_factory=lambda: TimestepPolicy("uniform", count=10))
    seed: int = 1000  # apart from the evaluation seeds (0, 1, ...): quality is never measured on calibration data
    guidance: float | None = None  # null: the model's default (3 for conditional models with a null label, else 1)
    batch_size: int = 64
    conditions: ConditionSource = field(default_factory=ConditionSource)  # labels / states / a file of embeddings

    def __post_init__(self) -> None:
        check_allowed("sampler", self.sampler, SAMPLERS)
        check_at_least(self, 1, "steps", "samples", "batch_size")


@dataclass
class EvaluationConfig:
    """How the compressed model is measured against the uncompressed one (:func:`diffpress.evaluate`: same
    sampler, seeds ``seed .. seed+samples-1``), and which figures the summary shows. ``ort_speed`` also
    times the ONNX export against an fp32 ONNX export of the original in ONNX Runtime, side by side."""

    samples: int = 100
    steps: int = 50
    sampler: str | None = "auto"
    guidance: float | None = None
    seed: int = 0
    conditions: ConditionSource = field(default_factory=ConditionSource)
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim", "cond_accuracy", "fd_real", "size",
                                                        "ort_speed"])
    latency_repeats: int = 10  # PyTorch eager latency (of a fake-quant simulation for quantized models)
    ort_repeats: int = 20
    ort_threads: int = 1
    ort_batch: int = 1

    def __post_init__(self) -> None:
        check_allowed("sampler", self.sampler, SAMPLERS)
        for m in self.metrics:
            check_allowed("metrics", m, METRICS)
        check_at_least(self, 1, "steps", "latency_repeats", "ort_repeats", "ort_batch")
        check_at_least(self, 0, "ort_threads")
        if self.samples < 2:
            raise DiffpressError(f"samples: must be >= 2 (the Fréchet distance needs two), got {self.samples}")


@dataclass
class ExportConfig:
    """One artifact to write: ``format`` onnx (Q/DQ, checked in ONNX Runtime), executorch (``.pte`` for the XNNPACK
    backend, checked in the ExecuTorch runtime; the optional extra) or torchscript (``jit.trace``, deprecated)."""

    format: str = "onnx"
    opset: int | None = None  # ONNX only; null: 21
    dtype: str = "float32"  # input / output dtype; float32 only so far
    dynamic_batch: bool | None = None  # null: true for ONNX; TorchScript traces a fixed batch
    batch: int = 2  # the batch traced (TorchScript's and ExecuTorch's fixed batch)
    # ONNX: the CPUs the artifact must agree on: "any" (AVX2 included) or "vnni" (VNNI / AMX / ARM / GPU);
    # null: whatever the quantize pass's target was. An artifact quantized for vnni is refused for any
    target: str | None = None
    # ONNX: the relative RMS difference ONNX Runtime may show against PyTorch; null: the loosest the passes
    # declare (1e-4 float, 5e-2 quantized). Random-weight models amplify one-step rounding differences more
    rtol: float | None = None

    def __post_init__(self) -> None:
        check_allowed("format", self.format, FORMATS)
        check_allowed("target", self.target, (None, "any", "vnni"))
        if self.target is not None and self.format != "onnx":
            raise DiffpressError("target: only ONNX exports name a CPU target; remove the key or set it to null")
        if self.rtol is not None and not (isinstance(self.rtol, (int, float)) and 0 < self.rtol < 1):
            raise DiffpressError(f"rtol: must be a number in (0, 1) or null, got {self.rtol!r}")
        check_allowed("dtype", self.dtype, ("float32",))
        check_at_least(self, 1, "batch")
        if self.format == "onnx":
            self.opset = 21 if self.opset is None else self.opset
            self.dynamic_batch = True if self.dynamic_batch is None else self.dynamic_batch
            from diffpress.exporters.onnx import supported_opsets

            ok = supported_opsets()
            if self.opset not in ok:
                raise DiffpressError(f"opset: {self.opset} is not allowed; allowed: {ok[0]} to {ok[-1]} (torch.onnx's "
                                     "dynamo exporter and this onnxscript); some passes need a newer one")
        else:
            name = {"torchscript": "TorchScript", "executorch": "ExecuTorch"}[self.format]
            if self.opset is not None:
                raise DiffpressError(f"opset: {name} has no opset; remove the key or set it to null")
            if self.dynamic_batch:
                raise DiffpressError(f"dynamic_batch: {name} traces a fixed batch; set false or null")
            self.dynamic_batch = False
        if self.format == "executorch":  # before anything is computed: the optional extra must be there
            from diffpress.exporters.executorch import require_installed

            require_installed()


@dataclass
class Recipe:
    """A compression run written down: calibration, ordered passes, exports and evaluation (``version: 1``)."""

    version: int = VERSION
    name: str | None = None  # null: the file name
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    passes: list[PassStep] = field(default_factory=list)
    exports: list[ExportConfig] = field(default_factory=list)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        check_allowed("version", self.version, (VERSION,))
        if not self.passes:
            raise DiffpressError(f"passes: empty; name at least one pass (allowed: {', '.join(registry.names())})")
        check_order([p.name for p in self.passes])
        configs = {p.name: p.config for p in self.passes}
        for i, p in enumerate(self.passes):
            problem = p.spec.recipe_check(p.config, configs) if p.spec.recipe_check else None
            if problem:
                raise DiffpressError(f"passes.{i}: {problem}")
        formats: dict[str, int] = {}
        for i, e in enumerate(self.exports):
            if e.format in formats:
                raise DiffpressError(f"exports.{i}: a second {e.format} export (first at exports.{formats[e.format]});"
                                     f" each format is written once, to <out>/{e.format}/")
            formats[e.format] = i
            for p in self.passes if e.format == "onnx" else ():
                need, why = p.spec.min_opset(p.config)
                if e.opset < need:
                    raise DiffpressError(f"exports.{i}.opset: {why}, got {e.opset}")
        if "ort_speed" in self.evaluation.metrics and "onnx" not in formats:
            raise DiffpressError("evaluation.metrics: ort_speed times the ONNX export; add {format: onnx} to "
                                 "exports or drop ort_speed")
        c, e = self.calibration, self.evaluation
        if self.needs_calibration and c.seed < e.seed + e.samples and e.seed < c.seed + c.samples:
            raise DiffpressError(
                f"evaluation.seed: the evaluation seeds {e.seed}..{e.seed + e.samples - 1} overlap the calibration "
                f"seeds {c.seed}..{c.seed + c.samples - 1}, so quality would be measured on calibration "
                f"trajectories; move one range (e.g. calibration.seed: {e.seed + e.samples})")

    @property
    def needs_calibration(self) -> bool:
        return any(p.spec.needs_calibration(p.config) for p in self.passes)


def builtin_recipes() -> dict[str, Path]:
    """Name -> file of the recipes shipped with diffpress.

    >>> sorted(builtin_recipes())
    ['cache', 'cache-w8a8', 'fast', 'prune30', 'prune30-w8a8', 'w4a4-lowrank', 'w4a8', 'w4a8-lowrank', 'w8a8']
    """
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def _find(source: str | Path) -> Path:
    text = str(source)
    builtins = builtin_recipes()
    if isinstance(source, str) and text in builtins:
        return builtins[text]
    path = Path(source)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise DiffpressError(f"no recipe file at {path}; give an existing YAML file or a built-in recipe "
                             f"({', '.join(builtins)})")
    raise DiffpressError(f"unknown recipe {text!r}; built-in recipes: {', '.join(builtins)} (diffpress recipes "
                         "lists them), or give the path to a YAML file")


def _read(path: Path) -> Any:
    try:
        return load_yaml(path.read_text(), str(path))
    except yaml.YAMLError as exc:
        raise DiffpressError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffpressError(f"{path}: cannot read the recipe ({exc})") from None


def from_data(data: Any, source: str, name: str | None = None) -> Recipe:
    """A :class:`Recipe` from parsed YAML; ``source`` names it in error messages, ``name`` is the default name."""
    where = Where(source)
    if not isinstance(data, dict):
        raise where.error(f"a recipe is a mapping (version, calibration, passes, exports, evaluation), got "
                          f"{show_value(data)}")
    if "version" not in data:
        raise where.error(f"missing key 'version'; add 'version: {VERSION}' at the top")
    if data["version"] != VERSION:
        raise (where / "version").error(f"{data['version']!r} is not supported by this diffpress; allowed: {VERSION}")
    recipe = build(Recipe, data, where)
    if recipe.name is None:
        recipe.name = name
    return recipe


def parse_override(text: str) -> tuple[str, Any]:
    """``"passes.0.weights=int4"`` -> ``("passes.0.weights", "int4")``; the value is read as YAML.

    >>> parse_override("passes.0.reconstruct=null"), parse_override("evaluation.metrics=[psnr, ssim]")
    (('passes.0.reconstruct', None), ('evaluation.metrics', ['psnr', 'ssim']))
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DiffpressError(f"--set {text}: expected KEY=VALUE, e.g. --set passes.0.weights=int4")
    try:
        return key.strip(), load_yaml(raw, f"--set {text}")
    except yaml.YAMLError as exc:
        raise DiffpressError(f"--set {text}: the value is not valid YAML ({' '.join(str(exc).split())})") from None


def apply_override(data: dict, key: str, value: Any, source: str) -> dict:
    """A copy of recipe ``data`` with ``key`` (a dotted path, list entries by index) set to ``value``.

    Missing sections on the way are created (``passes.0.reconstruct.iters=100`` turns a null
    ``reconstruct`` on with that setting); whether the key exists is checked when the result is validated.
    """
    data = copy.deepcopy(data)
    segs = key.split(".")
    node: Any = data
    for depth, seg in enumerate(segs):
        here, last = Where(source, tuple(segs[:depth + 1])), depth == len(segs) - 1
        if isinstance(node, list):
            if not seg.isdigit():
                raise here.error(f"expected a list index (0..{len(node) - 1})")
            if int(seg) >= len(node):
                raise here.error(f"no entry {seg}; the list has {len(node)} (indices 0..{len(node) - 1})")
            seg = int(seg)
        elif not isinstance(node, dict):
            raise Where(source, tuple(segs[:depth])).error(f"is {show_value(node)}, not a section; cannot set {key}")
        if last:
            node[seg] = value
        else:
            if (node.get(seg) if isinstance(node, dict) else node[seg]) is None:
                node[seg] = {}
            node = node[seg]
    return data


def load_recipe(source: str | Path | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """A validated :class:`Recipe` from a built-in name, a YAML file or a Recipe, with ``--set`` style overrides.

    Errors name the file (or the ``--set`` that caused them), the key path and what is allowed. The
    overrides are applied together, then checked: a recipe may pass through invalid states on the way
    (``--set exports=[] --set evaluation.metrics=[psnr]``).
    """
    if isinstance(source, Recipe):
        data, label, name = to_data(source), f"recipe {source.name}", source.name
        recipe = source
    else:
        path = _find(source)
        data, label, name = _read(path), str(path), path.stem
        recipe = from_data(data, label, name)
    sets: list[tuple[str, str]] = []
    for text in overrides:
        key, value = parse_override(text)
        data = apply_override(data, key, value, f"--set {text}")
        sets.append((key, text))
    if not sets:
        return recipe
    try:
        return from_data(data, label, name)
    except RecipeError as exc:
        # blame the last override on the failing key path (or above / below it), else all of them
        culprit = next((t for k, t in reversed(sets) if k == exc.key or exc.key.startswith(k + ".")
                        or k.startswith(exc.key + ".")), None)
        source = f"--set {culprit}" if culprit else f"{label} with " + " ".join(f"--set {t}" for _, t in sets)
        raise RecipeError(source, exc.key, exc.message) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default filled in, loadable by :func:`load_recipe`.

    >>> r = load_recipe("w8a8")
    >>> from_data(yaml.safe_load(dump_recipe(r)), "resolved") == r
    True
    """
    from diffpress._version import __version__

    header = (f"# resolved by diffpress {__version__}: every default filled in\n"
              f"# repeat the run with: diffpress run recipe.yaml --model ...\n")
    return header + yaml.safe_dump(to_data(recipe), sort_keys=False, default_flow_style=None, width=100)
