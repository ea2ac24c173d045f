"""Layer selection shared by every pass: which compute layers of the captured graph a pass rewrites, and why
it leaves the others alone.

A pass names the module types it can rewrite, the roles it keeps away from (roles come from the graph,
see :mod:`diffpress.graph.roles`) and glob patterns over module names; it may add its own rule. Every
layer left alone gets a reason, and the pass's report lists them.

>>> import diffpress
>>> from diffpress.graph import capture
>>> den = diffpress.load("digits-dit")
>>> sel = select_layers(den, capture(den, batch=2), skip_roles=["time_embedding"], skip=["*proj_out*"])
>>> sel.reasons()["model.proj_out_2"]
"matches skip pattern '*proj_out*'"
>>> len(sel.chosen) > 0
True
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn

from diffpress.errors import check_allowed
from diffpress.graph.capture import Graph, Layer
from diffpress.graph.roles import LAYER_ROLES

# what a rule that skipped a layer was: passes may treat some rules differently (e.g. weight-only int8
# for layers kept away by role)
RULES = ("op", "type", "shared", "role", "glob", "pass")
# compute ops with a weight (the others multiply two activations: attention, matmul, einsum)
WEIGHTED_OPS = ("linear", "conv2d", "conv1d", "conv_transpose2d")


def check_roles(key: str, roles: Iterable[str]) -> None:
    """Raise a :class:`~diffpress.DiffpressError` naming ``key`` if a role is not in the vocabulary."""
    for role in roles:
        check_allowed(key, role, LAYER_ROLES)


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob pattern that ``name`` matches, or ``None``."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


@dataclass
class Selection:
    """The layers a pass rewrites (``chosen``: graph layer and module, in execution order, each module once)
    and the layers it leaves alone (``skipped``: ``{name, reason, rule}``)."""

    chosen: list[tuple[Layer, nn.Module]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def reasons(self) -> dict[str, str]:
        return {s["name"]: s["reason"] for s in self.skipped}


def select_layers(denoiser: nn.Module, graph: Graph, *, types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
                  skip_roles: Iterable[str] = (), skip: Iterable[str] = (),
                  rule: Callable[[Layer, nn.Module], str | None] | None = None,
                  ops: tuple[str, ...] = ("linear", "conv2d")) -> Selection:
    """Split the compute layers of ``graph`` into those a pass rewrites and those it skips, with reasons.

    Rules, in order: the op is not one of ``ops`` (attention products); the module is not one of ``types``;
    the module runs more than once per call (shared weights); it has a role in ``skip_roles``; its name
    matches a pattern of ``skip``; the pass's own ``rule`` returns a reason.
    """
    skip_roles, skip = list(skip_roles), list(skip)
    calls: dict[str, int] = {}
    for layer in graph.layers:
        calls[layer.name] = calls.get(layer.name, 0) + 1
    sel, seen = Selection(), set()
    for layer in graph.layers:
        if layer.name in seen:
            continue
        seen.add(layer.name)
        module = denoiser.get_submodule(layer.name) if layer.op in ops else None
        reason, kind = _reason(layer, module, calls, skip_roles, skip, types, ops)
        if reason is None and rule is not None:
            reason, kind = rule(layer, module), "pass"
        if reason is None:
            sel.chosen.append((layer, module))
        else:
            sel.skipped.append({"name": layer.name, "reason": reason, "rule": kind})
    return sel


def _reason(layer: Layer, module: nn.Module | None, calls: dict[str, int], skip_roles: list[str], skip: list[str],
            types: tuple[type, ...], ops: tuple[str, ...]) -> tuple[str | None, str]:
    if module is None:
        if layer.op in WEIGHTED_OPS:
            return (f"{layer.op} ({layer.module_type}): this pass rewrites {', '.join(ops)} layers only, not "
                    f"{layer.op}", "op")
        return f"{layer.op}: activation-activation product, not rewritten by this pass", "op"
    if getattr(module, "keep_float", None):  # a module that declares itself float (a low-rank branch)
        return module.keep_float, "type"
    if type(module) not in types:
        return f"{type(module).__name__} is not an {' or '.join('nn.' + t.__name__ for t in types)}", "type"
    if calls[layer.name] > 1:
        return "module is called more than once per step (shared weights)", "shared"
    hit = sorted(set(skip_roles) & layer.roles)
    if hit:
        return f"role {hit[0]} (skip_roles)", "role"
    pattern = matches(layer.name, skip)
    if pattern is not None:
        return f"matches skip pattern {pattern!r}", "glob"
    return None, ""


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (a dotted path) of ``root`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
