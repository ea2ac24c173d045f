"""The ``cache`` pass: reuse deep features across sampling steps, on a schedule searched under a MAC budget.

Units come from the captured graph (:mod:`diffpress.graph.units`: a UNet's deep part below each skip level,
a DiT's blocks). A :class:`Schedule` is data: a ``[steps x units]`` table, ``True`` = recompute, ``False`` =
reuse what the unit returned at the last step that computed it (a block reuses its residual). It is tied to
a sampler and a step count. The pass replaces each unit module's ``forward`` with a small callable that
reads the denoiser's run-time context (step index, a reset per sampling run), so the model stays an
ordinary module and the sampling code does not change; outside a sampler every unit computes.

The search (``search``):

- ``uniform``: DeepCache's / FORA's rule, the baseline: every ``N``-th step computes, the others reuse one
  skip level's deep part (UNets) or every block (DiTs); each level and the smallest ``N`` within the budget
  are tried on the calibration seeds and the best is kept;
- ``greedy``: from one uncached run, how much each unit's cached value drifts between steps (L2 relative to
  what the unit returns, CacheQuant's / TeaCache's signal); reuses are added one at a time, least drift per
  MAC saved first, each charged from the step that last computed the unit, until the budget holds;
- ``search`` (default): the best of those two and of CacheQuant's dynamic programme (the uniform rule's
  number of full steps, placed to minimise the summed drift), then simulated annealing on the real
  objective (swap two steps' rows, move a reuse to another step, flip one entry), each candidate scored by
  sampling; time-bounded, the best schedule seen is kept.

The objective is the final-sample error against the uncached model on calibration seeds (``samples``), and
the chosen schedule is validated on held-out seeds (``holdout``), reported beside it. When the model is
quantized (``quantize`` ran before), the static activation ranges are refitted on the activations the
cached model sees while sampling with the schedule (CacheQuant's observation; ``calibrate_quantizers``).

>>> import diffpress
>>> den = diffpress.load("digits-dit")
>>> report = cache_(den, CacheConfig(budget=0.6, search="uniform", steps=10, samples=4, holdout=4), progress=False)
>>> report.schedule.table.shape, report.macs_fraction <= 0.6
((10, 4), True)
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

import diffpress.distributed as distributed
from diffpress.calibration.dataset import CalibrationSet
from diffpress.compress import registry
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError, check_allowed
from diffpress.graph.capture import capture
from diffpress.graph.units import CacheUnits, cache_units

SEARCHES = ("uniform", "greedy", "search")
SCHEDULE_FILE = "cache_schedule.json"


@dataclass
class CacheConfig:
    """Settings of the ``cache`` pass (see the module docstring).

    ``budget``: MACs of a cached sampling run as a fraction of the uncached one (``speedup``, if set,
    overrides it: ``budget = 1 / speedup``). ``steps`` / ``sampler`` / ``guidance``: the sampling the schedule
    is for (default: the calibration set's, else 50 / auto / the model's). ``samples`` calibration seeds
    score candidates (from ``seed``), ``holdout`` further seeds validate the result. ``time_budget`` bounds
    the local search (seconds). ``max_patterns``: distinct reuse patterns (each exports as one graph).
    ``calibrate_quantizers``: refit static activation ranges on the cached model's activations.
    ``interval`` (with ``search: uniform``): a fixed rule instead of a budget, DeepCache's ``N`` (every
    ``N``-th step computes) at skip level ``branch`` (0: the shallowest; DiTs reuse every block); nothing is
    scored, and ``holdout: 0`` skips the held-out check too (no sampling at all).
    """

    budget: float = 0.5
    speedup: float | None = None
    search: str = "search"
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    samples: int = 16
    holdout: int = 32
    seed: int = 0
    time_budget: float = 120.0
    max_patterns: int = 4
    calibrate_quantizers: bool = True
    interval: int | None = None
    branch: int = 0

    def __post_init__(self) -> None:
        check_allowed("search", self.search, SEARCHES)
        if self.speedup is not None:
            if self.speedup <= 1:
                raise DiffpressError(f"cache speedup must be > 1, got {self.speedup}")
            self.budget = 1.0 / self.speedup
        if not 0 < self.budget <= 1:
            raise DiffpressError(f"cache budget is a fraction of the uncached MACs in (0, 1], got {self.budget}")
        for name, least in (("samples", 1), ("holdout", 0), ("max_patterns", 1), ("branch", 0)):
            if getattr(self, name) < least:
                raise DiffpressError(f"cache {name} must be >= {least}, got {getattr(self, name)}")
        if self.interval is not None and (self.search != "uniform" or self.interval < 2):
            raise DiffpressError("cache interval (a fixed every-N rule) needs search: uniform and N >= 2")
        if self.steps is not None and self.steps < 2:
            raise DiffpressError(f"cache steps must be >= 2, got {self.steps}")


# -- the schedule ------------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """A ``[steps x units]`` recompute table over named units, for one sampler and step count.

    ``macs`` per unit (per sample, what a reuse saves), ``total`` MACs of one uncached call, ``inside`` the
    units nested in each (reusing a unit skips them). Row 0 computes everything (the cache starts empty).

    >>> s = Schedule(["a", "b"], [60, 30], 100, [(1,), ()], np.ones((4, 2), bool), "ddim", 4)
    >>> s.table[1:, 0] = False; s = s.canonical(); s.table.astype(int).tolist(), s.macs_fraction()
    ([[1, 1], [0, 0], [0, 0], [0, 0]], 0.55)
    """

    units: list[str]
    macs: list[int]
    total: int
    inside: list[tuple[int, ...]]
    table: np.ndarray
    sampler: str | None
    steps: int
    guidance: float = 1.0

    def canonical(self) -> Schedule:
        """Row 0 computes; a unit inside a reused unit counts as reused (it does not run)."""
        t = np.array(self.table, dtype=bool)
        t[0] = True
        for i, inner in enumerate(self.inside):
            for j in inner:
                t[:, j] &= t[:, i]
        return Schedule(self.units, self.macs, self.total, self.inside, t, self.sampler, self.steps, self.guidance)

    def with_table(self, table: np.ndarray) -> Schedule:
        return Schedule(self.units, self.macs, self.total, self.inside, table, self.sampler, self.steps,
                        self.guidance).canonical()

    def step_macs(self, table: np.ndarray | None = None) -> np.ndarray:
        """MACs per sample of each step."""
        t = self.table if table is None else table
        saved = np.zeros(len(t))
        for i, m in enumerate(self.macs):
            outer = [k for k, inner in enumerate(self.inside) if i in inner]
            effective = ~t[:, i] & np.all(t[:, outer], axis=1) if outer else ~t[:, i]
            saved += effective * m
        return self.total - saved

    def macs_fraction(self, table: np.ndarray | None = None) -> float:
        return float(self.step_macs(table).sum() / (self.total * self.steps))

    def patterns(self, table: np.ndarray | None = None) -> list[tuple[bool, ...]]:
        """Distinct rows other than all-compute, in order of first use."""
        t = self.table if table is None else table
        full = (True,) * len(self.units)
        return list(dict.fromkeys(tuple(map(bool, r)) for r in t if tuple(map(bool, r)) != full))

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "macs": self.macs, "total": self.total, "inside": [list(i) for i in self.inside],
                "table": self.table.astype(int).tolist(), "sampler": self.sampler, "steps": self.steps,
                "guidance": self.guidance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(list(d["units"]), list(d["macs"]), int(d["total"]), [tuple(i) for i in d["inside"]],
                   np.array(d["table"], dtype=bool), d["sampler"], int(d["steps"]), float(d.get("guidance", 1.0)))

    def picture(self) -> str:
        """The table as text: one line per unit, ``#`` recompute, ``.`` reuse, steps left to right."""
        width = max(len(u) for u in self.units)
        return "\n".join(f"{u:<{width}} " + "".join("#" if v else "." for v in self.table[:, i])
                         for i, u in enumerate(self.units))


# -- run time: the unit modules' forward reads the schedule -------------------------------------------------------
class CacheState:
    """The cache of one denoiser: its schedule, the stored values, and the export switches.

    ``pattern`` (export): a fixed recompute row for every call; ``feed`` gives reused values by key and
    ``emitted`` collects computed ones. ``table`` may be swapped (the search does) or ``None`` (no caching).
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule, modules: list[list[str]], kinds: list[str]):
        self.context = denoiser.runtime
        self.schedule = schedule
        self.table: np.ndarray | None = schedule.table
        self.modules, self.kinds = modules, kinds
        self.store: dict[str, Any] = {}
        self.pattern: tuple[bool, ...] | None = None
        self.feed: dict[str, torch.Tensor] | None = None
        self.emitted: dict[str, Any] | None = None
        self._where: tuple[int, int | None] | None = None
        self._calls: dict[str, int] = {}
        self._leaves: dict[str, tuple[int, Any]] = {}  # key -> (leaf count, pytree spec) of its stored value

    def _tick(self) -> None:
        where = (self.context.runs, self.context.step)
        if where != self._where:
            if self._where is None or where[0] != self._where[0]:
                self.store.clear()  # a new sampling run: nothing from the last trajectory is reused
            self._where, self._calls = where, {}

    def action(self, unit: int) -> str:
        """``compute`` (and store), ``reuse``, or ``plain`` (compute, store nothing: outside a sampler)."""
        if self.pattern is not None:
            return "compute" if self.pattern[unit] else "reuse"
        ctx = self.context
        if self.table is None or ctx.step is None:
            return "plain"
        if ctx.steps != len(self.table):
            raise DiffpressError(
                f"this model's cache schedule is for {len(self.table)} sampling steps "
                f"({self.schedule.sampler or 'model default'} sampler), but the sampler runs {ctx.steps}; sample "
                f"with steps={len(self.table)}, or rerun the cache pass with steps={ctx.steps}")
        self._tick()
        return "compute" if self.table[ctx.step, unit] else "reuse"

    @contextlib.contextmanager
    def fixed(self, pattern: tuple[bool, ...], feed: dict[str, torch.Tensor] | None = None) -> Iterator[dict]:
        """One call with a fixed recompute row (export): reused values come from ``feed``, computed ones are
        collected in the yielded dict; nothing is stored."""
        saved = self.pattern, self.feed, self.emitted, self._calls
        self.pattern, self.feed, self.emitted, self._calls = pattern, feed or {}, {}, {}
        try:
            yield self.emitted
        finally:
            self.pattern, self.feed, self.emitted, self._calls = saved

    def key(self, name: str) -> str:
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        return f"{name}#{k}"

    def get(self, key: str, unit: int):
        if self.pattern is not None:
            return pytree.tree_unflatten([self.feed[f"{key}.{j}"] for j in range(self._leaves[key][0])],
                                         self._leaves[key][1])
        if key not in self.store:
            raise DiffpressError(f"cache unit {self.schedule.units[unit]!r} is reused at step {self.context.step} "
                                 "before any step of this run computed it; a schedule computes every unit at step 0")
        return self.store[key]

    def put(self, key: str, value, output=None) -> None:
        """Store ``value`` (a residual unit's ``output - input``; ``output`` is its full result)."""
        leaves, spec = pytree.tree_flatten(value)
        if not all(torch.is_tensor(v) for v in leaves):
            raise DiffpressError(f"cache module {key.split('#')[0]!r} returned something other than tensors; it cannot "
                                 "be cached")
        self._leaves[key] = (len(leaves), spec)
        if self.emitted is not None:
            self.emitted.update({f"{key}.{j}": v for j, v in enumerate(leaves)})
        elif self.pattern is None:
            self.store[key] = value


def _activation(args, kwargs, like: torch.Tensor) -> torch.Tensor:
    for v in [*args, *kwargs.values()]:
        if torch.is_tensor(v) and v.shape == like.shape:
            return v
    raise DiffpressError("a residual cache unit was called without an input of its output's shape")


class CachedForward:
    """Replaces a unit module's ``forward``: computes (and stores) or returns the stored result."""

    def __init__(self, module: nn.Module, state: CacheState, unit: int, name: str, residual: bool):
        self.module, self.state, self.unit, self.name, self.residual = module, state, unit, name, residual

    def __call__(self, *args, **kwargs):
        st = self.state
        action = st.action(self.unit)
        if action == "reuse":
            key = st.key(self.name)
            cached = st.get(key, self.unit)
            return _activation(args, kwargs, cached) + cached if self.residual else cached
        out = type(self.module).forward(self.module, *args, **kwargs)
        if action == "compute":
            key = st.key(self.name)
            st.put(key, out - _activation(args, kwargs, out) if self.residual else out, out)
        return out


def install(denoiser: Denoiser, schedule: Schedule, modules: list[list[str]], kinds: list[str]) -> CacheState:
    """Attach ``schedule`` to ``denoiser``'s unit modules; returns the state (also ``denoiser.cache_state``)."""
    if getattr(denoiser, "cache_state", None) is not None:
        raise DiffpressError("this denoiser already has a cache schedule; cache runs once")
    state = CacheState(denoiser, schedule, modules, kinds)
    # nested units (UNet skip levels) share modules: each module follows the innermost unit that lists it (with
    # the canonical table, an outer unit's reuse implies the inner one's)
    innermost = {name: u for u, names in enumerate(modules) for name in names}
    for name, u in innermost.items():
        module = denoiser.get_submodule(name)
        if "forward" in module.__dict__:
            raise DiffpressError(f"module {name!r} already has a replaced forward; it cannot be a cache unit")
        module.forward = CachedForward(module, state, u, name, kinds[u] == "residual")
    denoiser.cache_state = state
    return state


def _uninstall(denoiser: Denoiser) -> None:
    for name in {n for names in denoiser.cache_state.modules for n in names}:
        denoiser.get_submodule(name).__dict__.pop("forward", None)
    denoiser.cache_state = None


# -- scoring -------------------------------------------------------------------------------------------------------
@dataclass
class _Sampling:
    denoiser: Denoiser
    sampler: str | None
    steps: int
    guidance: float
    cond: dict[str, Any]
    seeds: tuple[int, int]  # (first, count) of the seeds it scores on

    def run(self, seeds: tuple[int, int], progress: bool = False) -> torch.Tensor:
        from diffpress.sampling import sample

        first, n = seeds
        kw = {k: (v[:n] if v is not None else None) for k, v in self.cond.items()}
        if not any(v is not None for v in kw.values()):
            kw = {"num_samples": n}
        return sample(self.denoiser, steps=self.steps, scheduler=self.sampler, guidance=self.guidance, seed=first,
                      batch_size=max(n, 1), progress=progress, **kw).images


def _psnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    """PSNR (dB, data range 2: the reports' convention); a diverged candidate scores -inf."""
    from diffpress.eval.metrics import psnr

    return psnr(ref, got) if bool(torch.isfinite(got).all()) else -math.inf


def _conditions(denoiser: Denoiser, calibration: CalibrationSet | None, count: int, seed: int) -> dict[str, Any]:
    """Labels (class-conditional or a label conditioner) or conditioning rows of the calibration set."""
    if denoiser.cond_kind == "none":
        return {"labels": None, "cond": None}
    if denoiser.num_classes:
        g = torch.Generator().manual_seed(seed)
        return {"labels": torch.randint(0, denoiser.num_classes, (count,), generator=g), "cond": None}
    if calibration is None or calibration.cond is None:
        raise DiffpressError("the cache pass needs conditioning for its search: a calibration set with conditions "
                             "(this model is text-conditioned)")
    import diffpress.conditions as conditions

    rows = [i for i in range(len(calibration))][: max(count, 1)]
    return {"labels": None, "cond": conditions.take(calibration.rows(rows)[2], slice(0, count))}


# -- searches ------------------------------------------------------------------------------------------------------
def _drift(state: CacheState, sampling: _Sampling) -> np.ndarray:
    """``d[u, k, j]``: how far unit ``u``'s cached values at step ``j`` are from its values at step ``k``,
    relative to the size of what it returns at step ``k`` (for a block: its output, so a small residual
    that changes a lot still counts little); from one uncached run on the calibration seeds."""
    steps, n_units = sampling.steps, len(state.modules)
    rows: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n_units)]
    sizes: list[dict[int, float]] = [{} for _ in range(n_units)]
    owners: dict[str, list[int]] = {}
    for u, names in enumerate(state.modules):
        for name in names:
            owners.setdefault(name, []).append(u)

    def put(key, value, output=None):
        flat = [v.detach().double().flatten() for v in pytree.tree_flatten(value)[0]]
        size = sum(float(v.double().pow(2).sum()) for v in pytree.tree_flatten(value if output is None else output)[0])
        for u in owners[key.split("#")[0]]:
            rows[u].setdefault(state.context.step, []).extend(flat)
            sizes[u][state.context.step] = sizes[u].get(state.context.step, 0.0) + size
        CacheState.put(state, key, value, output)

    state.table, state.put = np.ones((steps, n_units), bool), put
    try:
        sampling.run(sampling.seeds)
    finally:
        del state.put
    d = np.zeros((n_units, steps, steps))
    for u in range(n_units):
        stacked = torch.stack([torch.cat(rows[u][k]) for k in range(steps)])
        norms = torch.tensor([sizes[u][k] for k in range(steps)], dtype=torch.float64).sqrt().clamp(min=1e-12)
        d[u] = (torch.cdist(stacked, stacked) / norms[:, None]).numpy()
    return d


def _proxy(schedule: Schedule, table: np.ndarray, drift: np.ndarray) -> float:
    """Summed drift of every effective reuse, charged from the step that last computed the unit."""
    total = 0.0
    for u in range(table.shape[1]):
        outer = [k for k, inner in enumerate(schedule.inside) if u in inner]
        last = 0
        for k in range(table.shape[0]):
            if table[k, u]:
                last = k
            elif not outer or np.all(table[k, outer]):
                total += drift[u, k, last]
    return total


def _uniform_groups(schedule: Schedule) -> list[list[int]]:
    """What a uniform rule reuses: one skip level at a time (nested units), or every block together."""
    n = len(schedule.units)
    return [[i] for i in range(n)] if any(schedule.inside) or n == 1 else [list(range(n))]


def _uniform_table(schedule: Schedule, group: list[int], interval: int) -> np.ndarray:
    """Every ``interval``-th step computes everything; the others reuse ``group``."""
    t = np.ones((schedule.steps, len(schedule.units)), bool)
    for k in range(schedule.steps):
        if k % interval:
            t[k, group] = False
    return schedule.with_table(t).table


def _uniform_candidates(schedule: Schedule, budget: float) -> list[np.ndarray]:
    """DeepCache / FORA: every N-th step computes; per level (UNet) or all blocks (DiT), the smallest N
    that meets the budget."""
    out = []
    for group in _uniform_groups(schedule):
        for interval in range(2, schedule.steps + 1):
            t = _uniform_table(schedule, group, interval)
            if schedule.macs_fraction(t) <= budget + 1e-9:
                out.append(t)
                break
    return out


def _dps(schedule: Schedule, uniform: np.ndarray, drift: np.ndarray) -> np.ndarray:
    """CacheQuant's dynamic programme: as many full steps as ``uniform`` has, reusing the same units at the
    other steps, placed to minimise the summed drift of every reuse from the full step before it."""
    steps = schedule.steps
    group = [u for u in range(uniform.shape[1]) if not uniform[:, u].all()]
    full = int(uniform.all(axis=1).sum())
    reuse = drift[group].sum(axis=0)  # cost of step k reusing what step j computed

    def segment(j: int, n: int) -> float:  # step j computes, j+1 .. n-1 reuse
        return float(sum(reuse[i, j] for i in range(j + 1, n)))

    inf = math.inf
    best = np.full((steps + 1, full + 1), inf)
    back = np.zeros((steps + 1, full + 1), dtype=int)
    for n in range(1, steps + 1):  # steps 0 .. n-1 covered by one segment starting at 0
        best[n, 1] = segment(0, n)
    for m in range(2, full + 1):
        for n in range(m, steps + 1):
            for j in range(m - 1, n):  # the last segment starts at step j
                c = best[j, m - 1] + segment(j, n)
                if c < best[n, m]:
                    best[n, m], back[n, m] = c, j
    starts, n = [], steps
    for m in range(full, 1, -1):
        j = back[n, m]
        starts.append(j)
        n = j
    t = np.ones_like(uniform)
    for k in range(steps):
        if k not in starts and k != 0:
            t[k, group] = False
    return schedule.with_table(t).table


def _greedy(schedule: Schedule, budget: float, drift: np.ndarray, max_patterns: int) -> np.ndarray | None:
    t = schedule.with_table(np.ones_like(schedule.table)).table
    while schedule.macs_fraction(t) > budget + 1e-9:
        base_macs, base_cost = schedule.step_macs(t).sum(), _proxy(schedule, t, drift)
        best, best_score = None, math.inf
        for k in range(1, t.shape[0]):
            for u in range(t.shape[1]):
                if not t[k, u]:
                    continue
                cand = t.copy()
                cand[k, u] = False
                cand = schedule.with_table(cand).table
                saved = base_macs - schedule.step_macs(cand).sum()
                if saved <= 0 or len(schedule.patterns(cand)) > max_patterns:
                    continue
                score = (_proxy(schedule, cand, drift) - base_cost) / saved
                if score < best_score:
                    best, best_score = cand, score
        if best is None:
            return None
        t = best
    return t


def _moves(t: np.ndarray, rng: random.Random) -> np.ndarray:
    """One random neighbour: swap two steps' rows, move one reuse to another step, or retarget one reuse."""
    c = t.copy()
    steps, n = t.shape
    kind = rng.random()
    if kind < 0.4:
        a, b = rng.randrange(1, steps), rng.randrange(1, steps)
        c[[a, b]] = c[[b, a]]
    elif kind < 0.8:
        reused = np.argwhere(~c[1:]) + [1, 0]
        computed = np.argwhere(c[1:]) + [1, 0]
        if len(reused) and len(computed):
            (a, u), (b, v) = reused[rng.randrange(len(reused))], computed[rng.randrange(len(computed))]
            c[a, u], c[b, v] = True, False
    else:
        k = rng.randrange(1, steps)
        u = rng.randrange(n)
        c[k, u] = not c[k, u]
    return c


# -- the pass ----------------------------------------------------------------------------------------------------
@dataclass
class CacheReport:
    """What the cache pass found and chose; PSNRs (dB) of final samples against the uncached model."""

    config: dict[str, Any]
    units: list[dict[str, Any]]
    schedule: Schedule
    macs_fraction: float
    search_psnr: float
    holdout_psnr: float
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    quantizers: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [(f"cache: {len(self.units)} units ({self.units[0]['kind'] if self.units else '-'}), "
                  f"{self.config['search']} schedule for {self.schedule.steps} steps: {self.macs_fraction:.1%} of the "
                  f"uncached MACs ({1 / self.macs_fraction:.2f}x fewer), {len(self.schedule.patterns())} reuse patterns")]
        if not math.isnan(self.search_psnr) or not math.isnan(self.holdout_psnr):
            lines.append(f"  final samples vs uncached: {self.search_psnr:.2f} dB on the {self.config['samples']} search "
                         f"seeds, {self.holdout_psnr:.2f} dB on {self.config['holdout']} held-out seeds "
                         f"({self.evaluations} schedules scored in {self.seconds:.0f} s)")
        for name, c in self.candidates.items():
            lines.append(f"  {name}: {c['macs_fraction']:.1%} MACs, {c['psnr']:.2f} dB (search seeds)")
        if self.quantizers:
            lines.append(f"  quantizers refitted on cached activations: {self.quantizers['refitted']}")
        lines.append("  schedule (# recompute, . reuse):\n" + "\n".join("    " + r for r in self.schedule.picture().splitlines()))
        return "\n".join(lines)


def _sampling_settings(denoiser: Denoiser, calibration: CalibrationSet | None, config: CacheConfig):
    meta = calibration.meta if calibration is not None else {}
    steps = config.steps or int(meta.get("steps", 50))
    sampler = config.sampler if config.sampler is not None else meta.get("scheduler", "auto")
    if sampler == "model default":
        sampler = None
    guidance = config.guidance if config.guidance is not None else meta.get("guidance", denoiser.default_guidance)
    return steps, sampler, float(guidance)


def find_units(denoiser: Denoiser) -> CacheUnits:
    """The cacheable units of ``denoiser`` (captured at batch 2)."""
    return cache_units(capture(denoiser, batch=2))


def cache_(denoiser: Denoiser, config: CacheConfig | None = None, calibration: CalibrationSet | None = None, *,
           progress: bool = True) -> CacheReport:
    """Search a cache schedule for ``denoiser`` under ``config.budget`` and attach it (in place).

    >>> import diffpress
    >>> den = diffpress.load("digits-cond-unet")
    >>> r = cache_(den, CacheConfig(budget=0.5, search="greedy", steps=10, samples=4, holdout=4), progress=False)
    >>> r.macs_fraction <= 0.5, r.schedule.units[0]
    (True, 'deep@model.conv_in')
    """
    config = config or CacheConfig()
    if not isinstance(denoiser, Denoiser):
        raise DiffpressError("cache_ takes a diffpress.Denoiser; wrap your module: Denoiser(module, sample_shape=...)")
    started = time.perf_counter()
    found = find_units(denoiser)
    steps, sampler, guidance = _sampling_settings(denoiser, calibration, config)
    n = len(found.units)
    schedule = Schedule(found.names(), [u.macs for u in found.units], found.macs, [u.inside for u in found.units],
                        np.ones((steps, n), bool), sampler, steps, guidance)
    floor = schedule.macs_fraction(schedule.with_table(np.zeros((steps, n), bool)).table)
    if config.interval is None and config.budget < floor - 1e-9:
        raise DiffpressError(f"a cache budget of {config.budget:.1%} of the MACs is out of reach: reusing every unit at "
                             f"every step but the first still costs {floor:.1%} (the part no unit covers); "
                             f"ask for at least {math.ceil(floor * 1000) / 1000}")
    modules = [list(u.modules) for u in found.units]
    kinds = [u.kind for u in found.units]
    state = install(denoiser, schedule, modules, kinds)
    quantized = any(r.get("pass") == "quantize" for r in denoiser.compression)
    samples = config.interval is None or config.holdout > 0 or (config.calibrate_quantizers and quantized)
    cond = _conditions(denoiser, calibration, config.samples + config.holdout, config.seed) if samples \
        else {"labels": None, "cond": None}
    seeds, held = (config.seed, config.samples), (config.seed + config.samples, config.holdout)
    held_cond = {k: (v[config.samples:] if v is not None else None) for k, v in cond.items()}
    sampling = _Sampling(denoiser, sampler, steps, guidance, cond, seeds)
    held_sampling = _Sampling(denoiser, sampler, steps, guidance, held_cond, held)
    try:
        state.table = None
        ref = sampling.run(seeds) if config.interval is None else None
        evaluations = 0

        def score(table: np.ndarray) -> float:
            nonlocal evaluations
            evaluations += 1
            state.table = table
            return _psnr(ref, sampling.run(seeds))

        candidates: dict[str, tuple[np.ndarray, float]] = {}
        if config.interval is not None:  # a fixed DeepCache / FORA rule: nothing to score
            groups = _uniform_groups(schedule)
            candidates["uniform"] = (_uniform_table(schedule, groups[min(config.branch, len(groups) - 1)],
                                                    config.interval), math.nan)
        else:
            uniform = [t for t in _uniform_candidates(schedule, config.budget)
                       if len(schedule.patterns(t)) <= config.max_patterns]
            if uniform:
                best_u = max(((score(t), t) for t in uniform), key=lambda p: p[0])
                candidates["uniform"] = (best_u[1], best_u[0])
        if config.search in ("greedy", "search"):
            drift = _drift(state, sampling)
            greedy = _greedy(schedule, config.budget, drift, config.max_patterns)
            if greedy is not None:
                candidates["greedy"] = (greedy, score(greedy))
            if config.search == "search" and config.interval is None:
                placed = [(score(t), t) for t in (_dps(schedule, u, drift) for u in uniform)]
                if placed:
                    best_p = max(placed, key=lambda p: p[0])
                    candidates["dps"] = (best_p[1], best_p[0])
        if not candidates:
            raise DiffpressError(f"no schedule within {config.budget:.1%} of the MACs and {config.max_patterns} reuse "
                                 "patterns; raise the budget or max_patterns")
        order = ("uniform",) if config.search == "uniform" else ("greedy",) if config.search == "greedy" \
            else tuple(candidates)
        table, best = max((candidates[k] for k in order if k in candidates), key=lambda c: c[1])
        if config.search == "search":
            # the search runs until a deadline: under torchrun every rank takes rank 0's schedule
            table, best = distributed.broadcast(_local_search(schedule, table, best, score, config, progress))
            candidates["search"] = (table, best)
        chosen = schedule.with_table(table)
        quant = _refit_quantizers(denoiser, sampling, chosen.table, progress) if config.calibrate_quantizers else {}
        state.schedule = chosen
        if quant and ref is not None:
            best = score(chosen.table)
        held_psnr = math.nan
        if config.holdout:
            state.table = None
            ref_held = held_sampling.run(held)
            state.table = chosen.table
            held_psnr = _psnr(ref_held, held_sampling.run(held))
        state.table = chosen.table
    except BaseException:
        _uninstall(denoiser)
        raise
    report = CacheReport(asdict(config), [{"name": u.name, "kind": u.kind, "modules": list(u.modules), "macs": u.macs,
                                           "macs_fraction": u.macs / found.macs} for u in found.units],
                         chosen, chosen.macs_fraction(), best, held_psnr,
                         {k: {"macs_fraction": schedule.macs_fraction(t), "psnr": p} for k, (t, p) in candidates.items()},
                         evaluations, time.perf_counter() - started, quant)
    denoiser.compression.append({"pass": "cache", "config": asdict(config), "kinds": kinds, "modules": modules,
                                 "schedule": chosen.to_dict(),
                                 "figures": {"search_psnr": best, "holdout_psnr": held_psnr,
                                             "macs_fraction": report.macs_fraction}})
    return report


def _local_search(schedule: Schedule, table: np.ndarray, best: float, score, config: CacheConfig,
                  progress: bool) -> tuple[np.ndarray, float]:
    """Simulated annealing on the real objective within the budget and the pattern limit, until time runs out:
    a worse neighbour is accepted with probability ``exp(-loss / temperature)``, the temperature falling from
    0.5 dB to 0; the best schedule seen is returned."""
    rng = random.Random(config.seed)
    start = time.perf_counter()
    deadline = start + config.time_budget
    seen = {table.tobytes()}
    current, value_now = table, best
    with tqdm(total=int(config.time_budget), desc="cache schedule search", disable=not progress, leave=False,
              unit="s") as bar:
        tries = 0
        while time.perf_counter() < deadline and tries < 50_000:
            tries += 1
            cand = schedule.with_table(_moves(current, rng)).table
            if cand.tobytes() in seen or schedule.macs_fraction(cand) > config.budget + 1e-9 \
                    or len(schedule.patterns(cand)) > config.max_patterns:
                continue
            seen.add(cand.tobytes())
            value = score(cand)
            temperature = 0.5 * max(0.0, 1 - (time.perf_counter() - start) / config.time_budget)
            if value > value_now or (temperature > 0 and rng.random() < math.exp((value - value_now) / temperature)):
                current, value_now = cand, value
            if value > best:
                table, best = cand, value
            bar.n = min(int(time.perf_counter() - start), bar.total)
            bar.set_postfix(psnr=f"{best:.2f}")
            bar.refresh()
    return table, best


# -- cache + quantization: refit static activation ranges on the cached model's activations -------------------------
def _refit_quantizers(denoiser: Denoiser, sampling: _Sampling, table: np.ndarray, progress: bool) -> dict[str, Any]:
    from diffpress.calibration.observers import StepStats
    from diffpress.compress.quant import ActQuant, act_qparams, aggregate_range
    from diffpress.runtime import hooks

    quant = next((r for r in denoiser.compression if r.get("pass") == "quantize"), None)
    acts = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, ActQuant)]
    if quant is None or not acts:
        return {}
    qc = quant["config"]
    gen = torch.Generator().manual_seed(0)
    stats: dict[str, dict[float, StepStats]] = {n: {} for n, _ in acts}

    def observer(name):
        def hook(module, args):
            t = float(denoiser.runtime.t.reshape(-1)[0])
            stats[name].setdefault(t, StepStats()).update(args[0], 4096, gen)
        return hook

    denoiser.cache_state.table = table
    with hooks([(m, "pre", observer(n)) for n, m in acts]):
        sampling.run(sampling.seeds, progress=progress)
    refitted = 0
    for name, m in acts:
        per_t = stats[name]
        if not per_t:
            continue
        bounds = m.bounds.tolist()
        for g in range(m.groups):
            steps = [s for t, s in per_t.items() if sum(t >= b for b in bounds) == g]
            if not steps:
                continue
            lo, hi = aggregate_range(steps, qc.get("act_rule", "mse"), m.bits, m.symmetric, qc.get("percentile", 99.99))
            scale, zp = act_qparams(lo, hi, m.bits, m.symmetric)
            m.scale[g], m.zero_point[g] = scale, zp
        refitted += 1
    return {"refitted": refitted, "quantizers": len(acts)}


# -- restore and export ------------------------------------------------------------------------------------------
def restore_cache(denoiser: Denoiser, record: dict[str, Any]) -> None:
    schedule = Schedule.from_dict(record["schedule"])
    install(denoiser, schedule, [list(m) for m in record["modules"]], list(record["kinds"]))
    denoiser.compression.append(record)


class _StepGraph(nn.Module):
    """One sampling step with a fixed recompute row: ``sample, timestep, *cond, *cache_in -> out, *cache_out``."""

    def __init__(self, denoiser: Denoiser, pattern: tuple[bool, ...], cache_in: list[str], cache_out: list[str]):
        super().__init__()
        from diffpress.exporters.plan import DenoiserGraph

        self.call = DenoiserGraph(denoiser)
        self.pattern, self.cache_in, self.cache_out = pattern, cache_in, cache_out
        self.n_cond = len(denoiser.cond_names)
        self.fill: dict[str, torch.Tensor] = {}  # values the pattern never reads, at batch 1

    def forward(self, sample, timestep, *rest):
        st = self.call.denoiser.cache_state
        cond, cached = rest[: self.n_cond], rest[self.n_cond:]
        feed = dict(zip(self.cache_in, cached))
        for key, like in self.fill.items():  # values this pattern never reads: any tensor of the right shape
            feed.setdefault(key, like.expand(sample.shape[0], *like.shape[1:]))
        with st.fixed(self.pattern, feed) as emitted:
            out = self.call(sample, timestep, *cond)
        return (out, *[emitted[k] for k in self.cache_out]) if self.cache_out else out


def _slots(denoiser: Denoiser, example: tuple, pattern: tuple[bool, ...],
           needed: set[str]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Run one full step on ``example`` (every cache value keyed), then ``pattern`` with those values as leaf
    tensors: the keys that its prediction and its emitted values in ``needed`` depend on (autograd), and the
    keys it emits."""
    st = denoiser.cache_state
    full = _StepGraph(denoiser, (True,) * len(st.modules), [], [])
    with denoiser.runtime.using(mode="plain"):
        with torch.no_grad(), st.fixed(full.pattern) as values:
            full.call(*example)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in values.items()}
        with torch.enable_grad(), st.fixed(pattern, dict(leaves)) as emitted:
            out = full.call(*example)
            total = out.float().sum() + sum(v.float().sum() for k, v in emitted.items() if k in needed)
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    used = [k for k, g in zip(leaves, grads) if g is not None]
    return values, used, list(emitted)


def _export_plan(plan, denoiser: Denoiser, record: dict[str, Any]) -> None:
    """A full-step graph (``model``) that also emits the cache values later steps read, one graph per
    distinct reuse pattern reading them, and ``cache_schedule.json`` saying which graph runs at which step."""
    from diffpress.exporters.plan import GraphSpec, io_names

    schedule = Schedule.from_dict(record["schedule"])
    main = plan.graphs[0]
    example = main.example(2, 0)
    patterns = schedule.patterns()
    reads: dict[tuple, list[str]] = {}
    emits: dict[tuple, list[str]] = {}
    full = (True,) * len(schedule.units)
    values: dict[str, torch.Tensor] = {}
    needed: set[str] = set()
    while True:  # what a pattern reads may be what another emits for a third: iterate to the fixed point
        for p in [full, *patterns]:
            values, reads[p], emits[p] = _slots(denoiser, example, p, needed)
        grown = needed | {k for p in patterns for k in reads[p]}
        if grown == needed:
            break
        needed = grown
    needed = sorted(needed, key=list(values).index)
    names = {k: "cache." + k.replace("#", ".") for k in needed}
    likes = {k: v[:1].detach() for k, v in values.items()}
    graphs: list[tuple[str, tuple]] = [("model", full)] + [(f"cached_{i}", p) for i, p in enumerate(patterns)]
    plan.graphs.pop(0)
    spec_graphs = {}
    for gname, p in graphs:
        cache_in = [k for k in needed if k in reads[p]] if p != full else []
        cache_out = [k for k in needed if k in emits[p]]
        module = _StepGraph(denoiser, p, cache_in, cache_out)
        module.fill = {k: v for k, v in likes.items() if k not in cache_in}

        def example_fn(batch, seed, module=module, cache_in=cache_in):
            args = main.example(batch, seed)
            if not cache_in:
                return args
            computed = _StepGraph(denoiser, full, [], needed)
            with torch.no_grad():
                outs = computed(*args)
            by_key = dict(zip(needed, outs[1:]))
            return (*args, *[by_key[k] for k in cache_in])

        reused = [u for u, r in zip(schedule.units, p) if not r]
        plan.graphs.insert(len(spec_graphs), GraphSpec(
            gname, module, io_names(denoiser) + [names[k] for k in cache_in], ["out_sample"] + [names[k] for k in cache_out],
            example_fn, "one full step: the prediction and the cache values later steps read" if p == full
            else f"a cached step reusing {', '.join(reused)}"))
        spec_graphs[gname] = {"reuses": reused, "inputs": [names[k] for k in cache_in],
                              "outputs": [names[k] for k in cache_out]}
    row_graph = {p: g for g, p in graphs}
    per_step = [row_graph[tuple(map(bool, r))] for r in schedule.table]
    plan.add_file(SCHEDULE_FILE, json.dumps({
        "format": "diffpress.cache_schedule/1", "steps": schedule.steps, "sampler": schedule.sampler,
        "guidance": schedule.guidance, "units": schedule.units, "table": schedule.table.astype(int).tolist(),
        "graph_per_step": per_step, "graphs": spec_graphs,
        "note": "run graph_per_step[i] at step i; feed each graph's cache inputs from the latest outputs of that name"},
        indent=2) + "\n")


def _summary(report: CacheReport) -> str:
    return report.summary()


registry.register(registry.PassSpec(
    "cache", CacheConfig,
    lambda den, config, calibration, progress: cache_(den, config, calibration, progress=progress),
    restore_cache, last=True, once=True, needs_calibration=lambda config: True,
    description="learned caching: deep features (UNet skip levels, DiT block residuals) reused across steps on a "
                "schedule searched against the final samples under a MAC budget",
    export_plan=_export_plan, summary=_summary,
))
