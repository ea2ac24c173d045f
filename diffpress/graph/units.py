"""Cacheable units of a captured denoiser: what a cache schedule may reuse from an earlier step.

Two kinds, both found on the ATen graph from its data flow and ``nn_module_stack`` (no module names):

- ``deep`` (UNets; DeepCache's branches, at every depth): a skip concatenation ``cat([h, s])`` (channels of
  feature maps, or features of tokens: U-ViT / HunyuanDiT long skips) whose ``h`` descends from ``s`` splits
  the network at that skip level. The *deep part* is every node on a path from
  ``s`` to ``h`` (the deeper down blocks, the middle, the deeper up blocks). At a reuse step the modules
  lying wholly inside it return what they returned at the last step that computed them; the shallow part
  (everything up to ``s``, then the concat and the outer up blocks) runs. Units nest: a shallower level's
  deep part holds every deeper level's.
- ``residual`` (DiTs; FORA / Δ-DiT / Learning-to-Cache): modules of one type that map one activation to one
  activation of the same shape and are chained with their siblings (the output of one is the input of the next, e.g.
  transformer blocks). At a reuse step such a block returns ``input + (output - input)`` of the last step
  that computed it: the residual is reused, the fresh input kept.

A graph with skip concatenations gets ``deep`` units; otherwise ``residual`` units. MACs a reuse saves are
counted on the graph (per sample): the compute nodes inside the modules a reuse replaces.

>>> import diffpress
>>> from diffpress.graph import capture
>>> found = cache_units(capture(diffpress.load("digits-dit")))
>>> [u.kind for u in found.units], found.units[0].modules
(['residual', 'residual', 'residual', 'residual'], ('model.transformer_blocks.0',))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from diffpress.errors import DiffpressError
from diffpress.graph.capture import Graph
from diffpress.graph.macs import COMPUTE_OPS, node_macs
from diffpress.graph.roles import input_dependencies, is_compute

aten = torch.ops.aten


@dataclass(frozen=True)
class CacheUnit:
    """One cacheable unit: ``modules`` (qualified names relative to the denoiser) are replaced by their
    cached result at a reuse step; ``macs`` per sample that saves; ``inside``: indices of the units nested
    in this one (a reuse of this unit skips theirs too)."""

    name: str
    kind: str  # "deep" | "residual"
    modules: tuple[str, ...]
    macs: int
    inside: tuple[int, ...] = ()


@dataclass
class CacheUnits:
    """The units of one graph, shallow (largest) first, and the MACs of one full call per sample."""

    units: list[CacheUnit]
    macs: int
    notes: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return [u.name for u in self.units]


def _paths(node: fx.Node) -> list[str]:
    return [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p]


def _type_of(node: fx.Node, path: str) -> str:
    for p, t in (node.meta.get("nn_module_stack") or {}).values():
        if p == path:
            return t if isinstance(t, str) else getattr(t, "__qualname__", str(t))
    return ""


def _module_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every module path -> the call nodes produced inside it (at any depth)."""
    members: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            for p in dict.fromkeys(_paths(n)):
                members.setdefault(p, []).append(n)
    return members


def _closure(start: fx.Node, forward: bool) -> set[fx.Node]:
    seen, frontier = set(), [start]
    while frontier:
        n = frontier.pop()
        for m in (n.users if forward else n.all_input_nodes):
            if m not in seen:
                seen.add(m)
                frontier.append(m)
    return seen


def _macs(gm: fx.GraphModule, modules: set[str], batch: int) -> int:
    total = sum(node_macs(n) for n in gm.graph.nodes
                if is_compute(n, COMPUTE_OPS) and modules.intersection(_paths(n)))
    return total // batch


def _maximal(paths: list[str]) -> list[str]:
    """Drop paths below another path of the list; keep execution order."""
    chosen: list[str] = []
    for p in sorted(paths, key=lambda s: s.count(".")):
        if not any(p.startswith(q + ".") for q in chosen):
            chosen.append(p)
    return [p for p in paths if p in chosen]


def _skip_concats(gm: fx.GraphModule, x_dep) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """``(cat, h, s)`` for every channel concat of two activations where ``h`` descends from ``s``."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != aten.cat.default:
            continue
        parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
        rank = len(n.meta["val"].shape)
        channels = (rank == 4 and dim in (1, -3)) or (rank == 3 and dim in (2, -1))  # feature maps or tokens
        if len(parts) != 2 or not channels or not all(map(x_dep, parts)):
            continue
        a, b = parts
        if b in _closure(a, forward=False):
            found.append((n, a, b))
        elif a in _closure(b, forward=False):
            found.append((n, b, a))
    return found


def _deep_units(gm: fx.GraphModule, batch: int, x_dep, members) -> list[tuple[CacheUnit, set]]:
    units = []
    for cat, h, s in _skip_concats(gm, x_dep):
        region = (_closure(s, forward=True) & _closure(h, forward=False)) | {h}
        inside = []
        for path, nodes in members.items():
            own = set(nodes)
            if not any(n in region for n in nodes):
                continue
            ok = all(n in region for n in nodes if x_dep(n) and n.users) and all(
                u in own for n in nodes if not x_dep(n) for u in n.users)
            if ok:
                inside.append(path)
        modules = _maximal(inside)
        if not modules:
            continue
        where = (_paths(s) or ["input"])[-1]
        units.append((CacheUnit(f"deep@{where}", "deep", tuple(modules), _macs(gm, set(modules), batch)), region))
    units.sort(key=lambda ur: -len(ur[1]))  # shallow level (largest deep part) first
    return units


def _residual_units(gm: fx.GraphModule, batch: int, x_dep, members) -> list[CacheUnit]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks = {}
    for path, nodes in members.items():
        own = set(nodes)
        ins = {a for n in nodes for a in n.all_input_nodes if a not in own and x_dep(a)}
        outs = [n for n in nodes if any(u not in own for u in n.users)]
        if len(ins) != 1 or len(outs) != 1:
            continue
        (i,) = ins
        shape_in, shape_out = getattr(i.meta.get("val"), "shape", None), getattr(outs[0].meta.get("val"), "shape", None)
        if shape_in is not None and shape_in == shape_out and any(is_compute(n, COMPUTE_OPS) for n in nodes):
            blocks[path] = (i, outs[0], order[nodes[0]], _type_of(nodes[0], path))
    chains: list[list[str]] = []
    for path in sorted(blocks, key=lambda p: blocks[p][2]):
        parent = path.rsplit(".", 1)[0]
        follows = [c for c in chains if c[-1].rsplit(".", 1)[0] == parent and blocks[c[-1]][1] is blocks[path][0]
                   and blocks[c[-1]][3] == blocks[path][3]]  # a stack of blocks: same type, chained
        if follows:
            follows[0].append(path)
        else:
            chains.append([path])
    chains = [c for c in chains if len(c) >= 2]
    outer = [c for c in chains if not any(c[0].startswith(p + ".") for d in chains if d is not c for p in d)]
    return [CacheUnit(p, "residual", (p,), _macs(gm, {p}, batch)) for c in outer for p in c]


def cache_units(graph: Graph) -> CacheUnits:
    """The cacheable units of a captured denoiser (see the module docstring).

    Raises :class:`DiffpressError` when the graph has neither skip concatenations nor chained blocks.
    """
    gm = graph.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    deps = input_dependencies(gm)
    x_name = placeholders[0].name

    def x_dep(n) -> bool:
        return isinstance(n, fx.Node) and x_name in deps.get(n, ())

    members = _module_nodes(gm)
    total = graph.macs // graph.batch
    deep = _deep_units(gm, graph.batch, x_dep, members)
    if deep:
        regions = [r for _, r in deep]
        units = [CacheUnit(u.name, u.kind, u.modules, u.macs,
                           tuple(j for j in range(len(deep)) if j != i and regions[j] <= regions[i]))
                 for i, (u, _) in enumerate(deep)]
        return CacheUnits(units, total)
    units = _residual_units(gm, graph.batch, x_dep, members)
    if not units:
        raise DiffpressError(
            "found no cacheable units on this graph: caching needs UNet skip concatenations (deep units, "
            "DeepCache) or a chain of blocks that each map one activation to one of the same shape (residual "
            "units: DiT / PixArt / Sana transformer blocks); blocks with two token streams (MMDiT: SD3, Flux "
            "double blocks) are not handled")
    return CacheUnits(units, total)
