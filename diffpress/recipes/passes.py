"""The pass registry: the compression passes a recipe may name, their configs and their ordering rules.

A pass is registered once with its config dataclass (the recipe schema for its entry), the function that
applies it, the function that rebuilds its modules when a saved model is loaded, and what it needs
around it. The design order is prune -> lowrank -> quantize -> cache; each pass states the part of it
that matters to it, and a recipe that breaks a rule is rejected before any work starts.

>>> check_order(["quantize", "quantize"])
Traceback (most recent call last):
...
diffpress.errors.DiffpressError: passes.1: quantize may run once per recipe; it already runs at passes.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from diffpress.calibration.dataset import CalibrationSet
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.compress.quantize import restore_quantize
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.recipes.validate import Where, build, to_data

DESIGN_ORDER = ("prune", "lowrank", "quantize", "cache")


def _always(config: Any) -> bool:
    return True


@dataclass(frozen=True)
class PassSpec:
    """A registered pass. ``apply(denoiser, config, calibration, progress)`` rewrites the denoiser in place
    and returns its report (an object with ``summary()``, ideally a dataclass)."""

    name: str
    config: type
    apply: Callable[[Denoiser, Any, CalibrationSet | None, bool], Any]
    restore: Callable[[Denoiser, dict], None] | None = None
    after: tuple[str, ...] = ()  # passes that must run before this one when the recipe has them
    last: bool = False  # nothing may follow it
    once: bool = False  # at most one entry per recipe
    needs_calibration: Callable[[Any], bool] = _always
    description: str = ""


PASSES: dict[str, PassSpec] = {}


def register_pass(spec: PassSpec) -> PassSpec:
    """Make ``spec`` available to recipes; its ``restore`` lets :func:`diffpress.load` rebuild saved models."""
    from diffpress.compress import RESTORERS

    PASSES[spec.name] = spec
    if spec.restore is not None:
        RESTORERS.setdefault(spec.name, spec.restore)
    return spec


def _quantize(denoiser: Denoiser, config: QuantizeConfig, calibration: CalibrationSet | None, progress: bool):
    return quantize_(denoiser, config, calibration, progress=progress)


register_pass(PassSpec(
    "quantize", QuantizeConfig, _quantize, restore_quantize, after=("prune", "lowrank"), once=True,
    # ranges come from calibration, reconstruction and bias correction fit to it; weight-only RTN needs none
    needs_calibration=lambda c: c.activations is not None or c.reconstruct is not None or c.bias_correction,
    description="timestep-aware post-training quantization (int8 / int4 weights, int8 activations)"))


def check_order(names: list[str]) -> None:
    """Raise :class:`DiffpressError` (key path ``passes.N``) if the pass names break an ordering rule."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        spec = PASSES[name]
        if spec.once and name in seen:
            raise DiffpressError(f"passes.{i}: {name} may run once per recipe; it already runs at passes.{seen[name]}")
        seen.setdefault(name, i)
        for j in range(i + 1, len(names)):
            if names[j] in spec.after:
                raise DiffpressError(f"passes.{i}: {name} must come after {names[j]} (passes.{j}); order the passes "
                                     f"as {' -> '.join(DESIGN_ORDER)}")
        if spec.last and i != len(names) - 1:
            raise DiffpressError(f"passes.{i}: {name} must be the last pass, but passes.{i + 1} ({names[i + 1]}) "
                                 "follows it")


@dataclass
class PassStep:
    """One entry of a recipe's ``passes`` list: ``{pass: NAME, <fields of NAME's config>}``."""

    name: str
    config: Any

    @property
    def spec(self) -> PassSpec:
        return PASSES[self.name]

    @classmethod
    def from_recipe(cls, data: dict, where: Where) -> "PassStep":
        name = data.get("pass")
        if name is None:
            raise where.error(f"missing key 'pass'; name one of: {', '.join(PASSES)}")
        if not isinstance(name, str) or name not in PASSES:
            raise (where / "pass").error(f"unknown pass {name!r}; allowed: {', '.join(PASSES)}")
        return cls(name, build(PASSES[name].config, {k: v for k, v in data.items() if k != "pass"}, where,
                               extra_keys=("pass",)))

    def to_recipe(self) -> dict[str, Any]:
        return {"pass": self.name, **to_data(self.config)}
