"""The ``passes`` section of a recipe: entries checked against the pass registry and its ordering rules.

The passes themselves, their configs and their rules live in :mod:`diffpress.compress.registry`; a recipe
entry names one (``{pass: NAME, <fields of its config>}``), and a recipe that breaks an ordering rule is
rejected before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffpress.compress import registry
from diffpress.compress.registry import DESIGN_ORDER, PassSpec
from diffpress.errors import DiffpressError
from diffpress.recipes.validate import Where, build, to_data


def check_order(names: list[str]) -> None:
    """Raise :class:`DiffpressError` (key path ``passes.N``) if the pass names break an ordering rule.

    >>> check_order([registry.names()[0]] * 2)
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: passes.1: ... may run once per recipe; it already runs at passes.0
    """
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        spec = registry.get(name)
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
        return registry.get(self.name)

    @classmethod
    def from_recipe(cls, data: dict, where: Where) -> "PassStep":
        name = data.get("pass")
        if name is None:
            raise where.error(f"missing key 'pass'; name one of: {', '.join(registry.names())}")
        try:
            spec = registry.get(name) if isinstance(name, str) else None
        except DiffpressError:
            spec = None
        if spec is None:
            raise (where / "pass").error(f"unknown pass {name!r}; allowed: {', '.join(registry.names())}")
        return cls(name, build(spec.config, {k: v for k, v in data.items() if k != "pass"}, where,
                               extra_keys=("pass",)))

    def to_recipe(self) -> dict[str, Any]:
        return {"pass": self.name, **to_data(self.config)}
