"""Dependency groups for structural pruning, found on the captured ATen graph (never from module names).

Every index of every dimension of every tensor in the graph gets a label. Ops tie labels together:

- equal: a residual add unites its operands' channels, a linear unites its input's last dimension with its
  weight's columns, a skip concat lays its inputs' labels side by side (offsets), a slice keeps a range;
- product: a reshape that splits channels into ``(heads, head_dim)`` (or merges them back) says that each
  channel is the pair of a head and a position; a GroupNorm says that each channel is the pair of a group
  and a position inside it;
- pinned: indices that must stay: the model's inputs and outputs, tensors made inside the graph (arange,
  full), the dimensions a LayerNorm, a softmax or a reduction runs over, positions inside a GroupNorm group,
  the inner dimensions of a reshape (a head's width: model code derives it from one value for q, k and v),
  and everything an op this module does not know touches.

A **unit** is a smallest set of labels that can be removed together: removing a head removes every channel
of that head in q, k, v and the output projection's columns; removing a GroupNorm group removes its channels
from every layer they reach, across adds and concats. A unit that reaches a pinned label cannot be removed.
Removing a unit from every parameter that carries its labels (weights, biases, norm parameters) gives a
smaller model whose output equals the original's with those slices set to zero.

>>> import diffpress
>>> from diffpress.graph import capture
>>> deps = dependencies(capture(diffpress.load("digits-dit"), batch=2))
>>> len(deps.units) > 0, all(u.params for u in deps.units)
(True, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diffpress.graph.capture import Graph
from diffpress.graph.labels import Builder


@dataclass
class Unit:
    """Labels removed together: ``params`` maps a parameter (name relative to the denoiser) to ``{dim: indices}``.
    ``kind`` is ``heads`` (an attention head), ``groups`` (a GroupNorm group) or ``channels``; ``macs``: what
    removing the unit alone saves (first order, at the captured batch); ``size``: indices along its widest
    dimension."""

    classes: np.ndarray
    kind: str
    params: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    macs: float = 0.0
    size: int = 0
    space: tuple = ()


@dataclass
class Dependencies:
    """The dependency groups of a captured graph: ``units`` that can be removed, the ``params`` each touches,
    ``unhandled`` ops (their tensors are kept whole), and the label classes of every parameter dimension."""

    graph: Graph
    units: list[Unit]
    cls: np.ndarray  # class of every label
    params: dict[str, list[np.ndarray]]  # parameter -> label classes per dim
    pinned: np.ndarray  # bool per class
    compute: list[tuple[str, list[np.ndarray], float]]  # node, label classes that scale its MACs, MACs
    unhandled: list[str]
    _rel: list = field(default_factory=list)
    labels: dict[str, list[np.ndarray]] = field(default_factory=dict)  # node -> label classes per dim

    def closure(self, seeds: np.ndarray) -> np.ndarray:
        """Bool mask over classes: the smallest consistent removal containing ``seeds``."""
        return _closure(self, np.asarray(seeds, dtype=np.int64))

    def kept_macs(self, removed: np.ndarray) -> float:
        """MACs of one call at the captured batch when the classes ``removed`` (bool mask) are gone."""
        total = 0.0
        for _, dims, macs in self.compute:
            frac = 1.0
            for d in dims:
                if len(d):
                    frac *= 1.0 - removed[d].mean()
            total += macs * frac
        return float(total)

    def kept_params(self, removed: np.ndarray) -> int:
        total = 0
        for dims in self.params.values():
            total += math.prod(int((~removed[d]).sum()) for d in dims)
        return total

    def masks(self, removed: np.ndarray) -> dict[str, list[np.ndarray]]:
        """For every parameter whose shape changes: per dimension, the bool mask of indices kept."""
        out = {}
        for name, dims in self.params.items():
            keep = [~removed[d] for d in dims]
            if any(not k.all() for k in keep):
                out[name] = keep
        return out


def dependencies(graph: Graph) -> Dependencies:
    """Label propagation over ``graph`` (from :func:`~diffpress.graph.capture`), resolved into units.

    >>> import diffpress
    >>> from diffpress.graph import capture
    >>> deps = dependencies(capture(diffpress.load("digits-cond-unet"), batch=2))
    >>> sorted({u.kind for u in deps.units})
    ['channels', 'groups', 'heads']
    """
    b = Builder(graph)
    b.build()
    lab = b.lab
    cls = lab.resolve()
    n = lab.count
    pinned = np.zeros(n, dtype=bool)
    for p in lab.pins:
        pinned[cls[p]] = True
    rel = [(cls[atoms], cls[f], kind) for atoms, f, kind in lab.relations]
    params = {name: [cls[d] for d in dims] for name, dims in b.params.items()}
    compute = [(node.name, [cls[d] for d in dims], float(macs)) for node, dims, macs in b.compute]
    labels = {name: [cls[a] for a in lab] for name, lab in b.labels.items() if isinstance(lab, list)}
    deps = Dependencies(graph, [], cls, params, pinned, compute, b.unknown, rel, labels)
    deps.units = _units(deps, {int(c) for h in b.attention_heads for c in cls[h]})
    return deps


def _closure(deps: Dependencies, seeds: np.ndarray, stop_at_pin: bool = False) -> np.ndarray:
    removed = np.zeros(len(deps.cls), dtype=bool)
    removed[seeds] = True
    touched = _touching(deps)
    todo = set()
    for s in seeds:
        todo.update(touched.get(int(s), ()))
    while todo:  # a relation changes only when one of its classes does: revisit just those
        changed = set()
        for r in sorted(todo):
            atoms, factors, _ = deps._rel[r]
            gone = removed[atoms]
            row_gone = removed[factors].any(axis=1)
            add = set()
            # a removed factor removes every atom it is part of
            new_atoms = atoms[row_gone & ~gone]
            add.update(int(c) for c in np.unique(new_atoms))
            # an atom removed alone must be covered: remove the outermost factor not pinned
            lone = gone & ~row_gone
            if lone.any():
                for i in range(factors.shape[1]):
                    col = factors[lone, i]
                    if not deps.pinned[col].any():
                        add.update(int(c) for c in np.unique(col))
                        break
                else:
                    add.update(int(c) for c in np.unique(factors[lone, 0]))
            add = {c for c in add if not removed[c]}
            if add:
                removed[list(add)] = True
                changed |= add
                if stop_at_pin and deps.pinned[list(add)].any():
                    return removed  # reaches a pinned label: not removable, no need to close further
        todo = set()
        for c in changed:
            todo.update(touched.get(c, ()))
        if not changed:
            break
    return removed


def _touching(deps: Dependencies) -> dict[int, list[int]]:
    cached = getattr(deps, "_touch", None)
    if cached is None:
        cached = {}
        for r, (atoms, factors, _) in enumerate(deps._rel):
            for c in np.unique(np.concatenate([atoms, factors.reshape(-1)])):
                cached.setdefault(int(c), []).append(r)
        deps._touch = cached
    return cached


def _units(deps: Dependencies, head_classes: set[int]) -> list[Unit]:
    """Seed a unit at every class a parameter dimension carries (and every factor class of a relation), close
    it, keep those that reach no pinned class; one unit per distinct closure."""
    touched = _touching(deps)
    factor_classes: set[int] = set()
    product_classes: set[int] = set()
    kinds: dict[int, str] = {}
    for atoms, factors, kind in deps._rel:
        product_classes.update(int(c) for c in np.unique(atoms))
        for c in np.unique(factors):
            factor_classes.add(int(c))
            kinds.setdefault(int(c), kind)
    param_classes: set[int] = set()
    for dims in deps.params.values():
        for d in dims:
            param_classes.update(int(c) for c in np.unique(d))
    seeds = sorted(c for c in (param_classes | factor_classes) if not deps.pinned[c])
    covered = np.zeros(len(deps.cls), dtype=bool)
    units: list[Unit] = []
    for c in seeds:
        if covered[c]:
            continue
        if c not in touched:  # a plain channel: nothing else to close over
            removed_idx = np.array([c])
        else:
            mask = _closure(deps, np.array([c]), stop_at_pin=True)
            if (mask & deps.pinned).any():
                continue
            removed_idx = np.flatnonzero(mask)
        covered[removed_idx] = True
        hit = {kinds.get(int(x)) for x in removed_idx}
        kind = "heads" if c in head_classes or any(int(x) in head_classes for x in removed_idx) else \
            ("groups" if "groups" in hit else "channels")
        units.append(Unit(removed_idx, kind))
    _describe(deps, units)
    return [u for u in units if u.params]


def _describe(deps: Dependencies, units: list[Unit]) -> None:
    """Parameters, first-order MACs and space of each unit (units may overlap: a head and a head-size column)."""
    pairs_c = np.concatenate([u.classes for u in units]) if units else np.zeros(0, dtype=np.int64)
    pairs_u = np.concatenate([np.full(len(u.classes), i) for i, u in enumerate(units)]) if units else pairs_c
    order = np.argsort(pairs_c, kind="stable")
    pairs_c, pairs_u = pairs_c[order], pairs_u[order]
    for name, dims in deps.params.items():
        for d, arr in enumerate(dims):
            lo, hi = np.searchsorted(pairs_c, arr, "left"), np.searchsorted(pairs_c, arr, "right")
            counts = hi - lo
            if not counts.any():
                continue
            idx = np.repeat(np.arange(len(arr)), counts)
            who = pairs_u[np.concatenate([np.arange(a, b) for a, b in zip(lo[counts > 0], hi[counts > 0])])]
            order = np.argsort(who, kind="stable")
            idx, who = idx[order], who[order]
            for i, part in zip(*_runs(who, idx)):
                units[i].params.setdefault(name, {})[d] = part
                units[i].size = max(units[i].size, len(part))
    saved = np.zeros(len(deps.cls))
    for _, dims, macs in deps.compute:
        for d in dims:
            if len(d):
                np.add.at(saved, d, macs / len(d))
    for u in units:
        u.macs = float(saved[u.classes].sum())
        u.space = tuple(sorted((p, d) for p, dd in u.params.items() for d in dd))


def _runs(keys: np.ndarray, values: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Split ``values`` by runs of equal ``keys`` (sorted)."""
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return [int(k[0]) for k in np.split(keys, cuts)], np.split(values, cuts)
