"""The one pass registry: every compression pass registers itself here, with the facts the rest of diffpress asks.

A pass is a module of :mod:`diffpress.compress` (or of another package) that calls :func:`register` with
a :class:`PassSpec`: its name, config dataclass, ``apply`` (rewrite a denoiser in place, append a record
to ``denoiser.compression``, return a report), ``restore`` (rebuild its modules from that record when a
saved model loads), its ordering rules, and what the loader, the recipes, the exporters and the report
need to know about it. None of them tests a pass name: they ask the registry.

A third party registers a pass from its own module, and makes it loadable by name (so that
``diffpress.load`` rebuilds saved models with nothing imported but ``diffpress``) with an entry point in
the ``diffpress.passes`` group, e.g. in its ``pyproject.toml``::

    [project.entry-points."diffpress.passes"]
    split_linear = "my_package.split_pass"

>>> from dataclasses import dataclass
>>> @dataclass
... class NoopConfig:
...     note: str = ""
>>> def apply(denoiser, config, calibration, progress):
...     denoiser.compression.append({"pass": "noop", "config": {"note": config.note}})
>>> spec = register(PassSpec("noop", NoopConfig, apply, restore=lambda den, record: den.compression.append(record),
...                          description="does nothing"))
>>> get("noop").description
'does nothing'
>>> del PASSES["noop"]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from diffpress.errors import DiffpressError

if TYPE_CHECKING:
    from diffpress.calibration.dataset import CalibrationSet
    from diffpress.denoiser import Denoiser

ENTRY_POINT_GROUP = "diffpress.passes"
# the order the design gives the built-in methods; each pass states the part of it that matters to it
DESIGN_ORDER = ("prune", "lowrank", "quantize", "cache")
FLOAT_RTOL = 1e-4  # export check of a model whose passes are exact in float


def _always(config: Any) -> bool:
    return True


def _no_opset(config: Any) -> tuple[int, str]:
    return 0, ""


def _summary(report: Any) -> str:
    return report.summary() if hasattr(report, "summary") else ""


@dataclass(frozen=True)
class PassSpec:
    """A registered pass and the facts it declares.

    - ``apply(denoiser, config, calibration, progress)`` rewrites ``denoiser`` in place, appends its record
      (``{"pass": name, "config": {...}, ...}``, JSON data) to ``denoiser.compression`` and returns a report
      (ideally a dataclass with ``summary()``; a ``skipped`` list of ``{name, reason}`` is shown per layer).
    - ``restore(denoiser, record)`` rebuilds the pass's modules on a freshly built architecture (the values
      then come from the saved state) and appends the record again.
    - ordering: ``after`` (passes that must run before it when a recipe has them), ``last``, ``once``.
    - ``needs_calibration(config)``: whether the pass reads calibration data.
    - ``simulated``: empty when the PyTorch model computes what the deployed artifact computes; else a
      sentence saying what the PyTorch model only simulates (reports print it beside quality figures).
    - ``export_rtol``: relative RMS within which an exported artifact must match the PyTorch model.
    - ``onnx_ops``: the exported ONNX graph must contain at least one node of these types (empty: no check);
      or a function of the pass's record giving them (e.g. none when the pass rewrote no layer).
    - ``min_opset(config)``: ``(opset, why)``, the oldest ONNX opset that can express the pass with this
      config and a sentence saying why (``(0, "")``: any).
    - ``onnx_rewrite(model, record)``: edits the exported ``onnx_ir`` model in place (e.g. retypes integer
      initializers) and returns facts for ``io_spec.json``; ``io_spec_defaults`` are those facts for an
      artifact the pass did not touch (every ONNX ``io_spec.json`` carries them, e.g. ``quantized: false``).
    - ``export_plan(plan, denoiser, record)``: adds graphs or files to an export plan (several graphs,
      a schedule file ...); see :mod:`diffpress.exporters.plan`.
    - ``summary(report)``: the lines reports show for the pass.
    - ``recipe_check(config, others)``: a recipe check across passes; ``others`` maps the recipe's pass names to
      their configs; returns an error message or None.
    """

    name: str
    config: type
    apply: Callable[["Denoiser", Any, "CalibrationSet | None", bool], Any]
    restore: Callable[["Denoiser", dict], None] | None = None
    after: tuple[str, ...] = ()
    last: bool = False
    once: bool = False
    needs_calibration: Callable[[Any], bool] = _always
    description: str = ""
    simulated: str = ""
    export_rtol: float = FLOAT_RTOL
    onnx_ops: tuple[str, ...] | Callable[[dict], tuple[str, ...]] = ()
    min_opset: Callable[[Any], tuple[int, str]] = _no_opset
    onnx_rewrite: Callable[[Any, dict], dict] | None = None
    io_spec_defaults: dict[str, Any] = field(default_factory=dict)
    export_plan: Callable[[Any, "Denoiser", dict], None] | None = None
    summary: Callable[[Any], str] = _summary
    recipe_check: Callable[[Any, dict[str, Any]], str | None] | None = None

    def config_of(self, record: dict[str, Any]) -> Any:
        """The config a saved record was made with."""
        return self.config(**record.get("config", {}))


PASSES: dict[str, PassSpec] = {}


def register(spec: PassSpec, *, replace: bool = False) -> PassSpec:
    """Make ``spec`` known to recipes, ``diffpress.load``, the exporters and the reports; returns it. A name
    already taken by another pass needs ``replace=True``."""
    if not isinstance(spec, PassSpec):
        raise DiffpressError(f"register() takes a PassSpec, got {type(spec).__name__}")
    if spec.name in PASSES and PASSES[spec.name] is not spec and not replace:
        raise DiffpressError(f"a pass named {spec.name!r} is already registered; pick another name, or pass "
                             "replace=True to replace it")
    if not dataclasses.is_dataclass(spec.config):
        raise DiffpressError(f"pass {spec.name!r}: its config must be a dataclass (the recipe schema reads its fields)")
    PASSES[spec.name] = spec
    return spec


def _from_entry_point(name: str) -> PassSpec | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                loaded = ep.load()  # importing the module registers the pass; a PassSpec object is registered here
            except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
                raise DiffpressError(f"the pass {name!r} comes from entry point {ep.value!r}, which failed to import "
                                     f"({type(exc).__name__}: {exc}); fix or uninstall that package") from exc
            if isinstance(loaded, PassSpec):
                register(loaded)
            return PASSES.get(name)
    return None


def get(name: str) -> PassSpec:
    """The pass registered as ``name``, importing it from its ``diffpress.passes`` entry point if needed."""
    spec = PASSES.get(name) if isinstance(name, str) else None
    if spec is None and isinstance(name, str):
        spec = _from_entry_point(name)
    if spec is None:
        raise DiffpressError(f"unknown pass {name!r}; this diffpress knows: {', '.join(names())} (a third-party "
                             f"pass is found through its '{ENTRY_POINT_GROUP}' entry point once its package is "
                             "installed)")
    return spec


def names() -> list[str]:
    """The registered pass names, in the design order first, then the others as registered."""
    return sorted(PASSES, key=lambda n: (DESIGN_ORDER.index(n) if n in DESIGN_ORDER else len(DESIGN_ORDER)))


def restore(denoiser: "Denoiser", records: list[dict[str, Any]]) -> None:
    """Re-apply the module rewrites recorded in a saved model's ``diffpress.json``, in order."""
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "pass" not in record:
            raise DiffpressError(f"diffpress.json: passes.{i} is not a pass record (a mapping with key 'pass')")
        spec = get(record["pass"])
        if spec.restore is None:
            raise DiffpressError(f"pass {spec.name!r} cannot rebuild a saved model (it registered no restore)")
        spec.restore(denoiser, record)


def specs(records: list[dict[str, Any]]) -> list[tuple[PassSpec, dict[str, Any]]]:
    """``(spec, record)`` for each record of ``denoiser.compression``."""
    return [(get(r["pass"]), r) for r in records]


def simulation_notes(records: list[dict[str, Any]]) -> list[str]:
    """What the PyTorch model of these passes only simulates (empty: it computes what is deployed)."""
    return list(dict.fromkeys(s.simulated for s, _ in specs(records) if s.simulated))


def export_rtol(records: list[dict[str, Any]]) -> float:
    """The tolerance an export of a model with these passes is verified at: the loosest one declared."""
    return max([FLOAT_RTOL, *(s.export_rtol for s, _ in specs(records))])


def io_spec_defaults() -> dict[str, Any]:
    """The ``io_spec.json`` facts every registered pass declares for an artifact it did not touch."""
    return {k: v for spec in PASSES.values() for k, v in spec.io_spec_defaults.items()}


def min_opset(records: list[dict[str, Any]]) -> tuple[int, str]:
    """``(opset, why)``: the oldest ONNX opset that can express every pass of these records, and the reason."""
    return max([(0, ""), *(s.min_opset(s.config_of(r)) for s, r in specs(records))], key=lambda p: p[0])
