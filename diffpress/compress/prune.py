"""The ``prune`` pass: remove whole channels, GroupNorm groups and attention heads, found on the captured graph.

Units come from :mod:`diffpress.graph.deps`. Each gets an importance, over the calibration trajectory:

- ``magnitude``: the squared norm of every weight slice the unit removes, each parameter's slices divided by
  their mean (so layers of different scale compare);
- ``taylor``: ``sum |w * dL/dw|`` over those slices, the gradients accumulated over every calibration step;
- ``diff_pruning``: the same, accumulated from the low-noise end of the trajectory until the loss falls below
  ``threshold`` x its largest value (Diff-Pruning's thresholding of steps that carry little signal).

The loss is the denoising loss at the calibration points: the trajectory's x0 estimates (from the full model's
prediction at each point) are noised again with fresh noise at the point's timestep and the model is asked for
the target its ``prediction_type`` names. (The teacher's own output as target gives a loss whose gradient is
exactly zero at the unpruned model, so it cannot rank anything.)

Units are removed globally in order of importance per MAC saved until ``target`` (fraction of MACs, or of
parameters) is gone; kept widths stay multiples of ``round_to`` where the unit sizes allow, and no layer keeps
less than ``min_keep`` of a dimension. The result is an ordinary, smaller module; the record carries the kept
shapes, so :func:`diffpress.load` rebuilds it. Optional recovery distils the original into it
(:mod:`diffpress.compress.recover`).

>>> import diffpress
>>> den = diffpress.load("digits-dit")
>>> cal = diffpress.calibrate(den, num_samples=4, steps=4, progress=False)
>>> report = diffpress.prune_(den, PruneConfig(target=0.3, importance="magnitude"), cal, progress=False)
>>> report.macs_after <= 0.7 * report.macs_before
True
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import diffpress.distributed as distributed
from diffpress.calibration.dataset import CalibrationSet
from diffpress.compress.recover import RecoverConfig, recover
from diffpress.compress.registry import PassSpec, register
from diffpress.compress.select import check_roles, select_layers
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError, check_allowed
from diffpress.graph.capture import capture
from diffpress.graph.deps import Dependencies, Unit, dependencies

IMPORTANCE = ("magnitude", "taylor", "diff_pruning")
_RESHAPES = ("view", "reshape", "_unsafe_view", "expand", "unflatten", "flatten")  # ops with literal sizes
GRANULARITY = ("channels", "heads")
MEASURES = ("macs", "params")


@dataclass
class PruneConfig:
    """``target``: fraction of MACs (``measure: macs``) or parameters removed; ``granularity``: what may go
    (``channels`` also covers GroupNorm groups, ``heads`` attention heads); ``importance``: ``magnitude``,
    ``taylor`` or ``diff_pruning`` (``threshold``: its loss ratio); ``samples``: calibration points used for the
    gradients; ``skip_roles`` / ``skip``: layers whose shapes must not change (roles, globs); ``round_to``: kept
    widths a multiple of this where units allow; ``min_keep``: least fraction of any layer dimension kept;
    ``recover``: distillation from the original after pruning (``null``: none)."""

    target: float = 0.3
    measure: str = "macs"
    granularity: list[str] = field(default_factory=lambda: ["channels", "heads"])
    importance: str = "diff_pruning"
    threshold: float = 0.05
    samples: int = 256
    batch_size: int = 16
    skip_roles: list[str] = field(default_factory=lambda: ["time_embedding", "cond_projection"])
    skip: list[str] = field(default_factory=list)
    round_to: int = 8
    min_keep: float = 0.1
    seed: int = 0
    recover: RecoverConfig | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target) < 1.0:
            raise DiffpressError(f"target: {self.target} is not a fraction between 0 and 1 (exclusive)")
        check_allowed("measure", self.measure, MEASURES)
        check_allowed("importance", self.importance, IMPORTANCE)
        for g in self.granularity:
            check_allowed("granularity", g, GRANULARITY)
        if not self.granularity:
            raise DiffpressError(f"granularity: empty; choose from {', '.join(GRANULARITY)}")
        check_roles("skip_roles", self.skip_roles)
        if int(self.round_to) < 1 or not 0.0 <= float(self.min_keep) < 1.0:
            raise DiffpressError("round_to must be >= 1 and min_keep a fraction in [0, 1)")
        if isinstance(self.recover, dict):
            self.recover = RecoverConfig(**self.recover)


@dataclass
class PruneReport:
    """Before / after figures (MACs per sample), the kept width of every changed layer, and the recovery's log."""

    macs_before: float
    macs_after: float
    params_before: int
    params_after: int
    units_removed: dict[str, int]
    units_available: dict[str, int]
    largest_unit_macs: float
    layers: list[dict[str, Any]]
    importance: str
    importance_steps: int = 0
    importance_seconds: float = 0.0
    seconds: float = 0.0
    recovery: dict[str, Any] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        removed = ", ".join(f"{v} {k}" for k, v in self.units_removed.items() if v)
        line = (f"prune ({self.importance}): MACs {self.macs_before / 1e6:.1f}M -> {self.macs_after / 1e6:.1f}M "
                f"(-{1 - self.macs_after / self.macs_before:.1%}), params {self.params_before / 1e6:.3f}M -> "
                f"{self.params_after / 1e6:.3f}M; removed {removed or 'nothing'}")
        if self.recovery:
            r = self.recovery
            line += (f"; recovery {r['steps']} steps in {r['seconds']:.0f} s, held-out MSE {r['initial']:.4g} -> "
                     f"{r['best']:.4g}")
        return line


# -- importance ------------------------------------------------------------------------------------------


def _schedule(den: Denoiser) -> tuple[int, torch.Tensor | None]:
    """``(num_train_timesteps, alphas_cumprod)`` of the model's training schedule (``None`` for flow models)."""
    cfg = den.scheduler_config or {}
    n = int(cfg.get("num_train_timesteps", 1000))
    if den.prediction_type == "flow":
        return n, None
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    return n, DDPMScheduler(**{k: v for k, v in cfg.items() if k in keys}).alphas_cumprod


def _noised(den: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)`` for the denoising loss at timesteps ``t`` under the model's prediction type."""
    n, ac = _schedule(den)
    if ac is None:  # rectified flow: x_t = (1 - s) x0 + s noise, velocity noise - x0
        s = (t.float() / n).view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, noise - x0
    a = ac[t.long().clamp(0, n - 1)].view(-1, 1, 1, 1).to(x0)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if den.prediction_type == "v_prediction":
        return xt, a.sqrt() * noise - (1 - a).sqrt() * x0
    return xt, (x0 if den.prediction_type == "sample" else noise)


def _x0(den: Denoiser, x: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The x0 estimate at a trajectory point from the full model's prediction."""
    n, ac = _schedule(den)
    if ac is None:
        return x - (t.float() / n).view(-1, 1, 1, 1) * pred
    if den.prediction_type == "sample":
        return pred
    a = ac[t.long().clamp(0, n - 1)].view(-1, 1, 1, 1).to(x)
    if den.prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred
    return (x - (1 - a).sqrt() * pred) / a.sqrt()


def _points(calibration: CalibrationSet, samples: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    n = len(calibration)
    return sorted(torch.randperm(n, generator=g)[:min(samples, n)].tolist())


def _gradients(den: Denoiser, calibration: CalibrationSet, config: PruneConfig, progress: bool) \
        -> tuple[dict[str, torch.Tensor], int]:
    """Accumulated ``dL/dw`` of every parameter over calibration points (low noise first), and the steps used.

    The work is split in pieces (one batch of one timestep, its own noise seed) that are spread over the
    ``torchrun`` processes and summed in piece order (:func:`diffpress.distributed.reduce_in_order`), so the
    importance is bit-identical for any number of processes."""
    idx = _points(calibration, config.samples, config.seed)
    by_t: dict[float, list[int]] = {}
    for i in idx:
        by_t.setdefault(float(calibration.t[i]), []).append(i)
    order = sorted(by_t)  # low noise first
    pieces = []  # a timestep's rows in near-equal batches of at most batch_size (ranks wait for the largest)
    for tv in order:
        rows = by_t[tv]
        cuts = np.linspace(0, len(rows), -(-len(rows) // config.batch_size) + 1).round().astype(int)
        pieces += [(tv, rows[lo:hi], len(rows)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    last = {k for k in range(len(pieces)) if k + 1 == len(pieces) or pieces[k + 1][0] != pieces[k][0]}
    params = dict(den.named_parameters())
    numel = sum(p.numel() for p in params.values())
    total_grad = torch.zeros(numel)
    was = den.training
    den.eval()

    def compute(k: int) -> torch.Tensor:  # the flat gradient, then the loss (a float32 value: exact)
        _, part, n_rows = pieces[k]
        x, t, cond = calibration.rows(part)
        with torch.no_grad():
            x0 = _x0(den, x, t, den(x, t, cond))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed((config.seed + 1) * 1_000_003 + k))
        xt, target = _noised(den, x0, t, noise)
        den.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(den(xt, t, cond), target, reduction="sum") / n_rows
        loss.backward()
        return torch.cat([*((p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                            for p in params.values()), loss.detach().float().reshape(1).cpu()])

    state = {"used": 0, "loss_max": 0.0, "step_loss": 0.0}
    bar = tqdm(total=len(pieces), desc="prune: importance", disable=not progress, leave=False)

    def consume(k: int, piece: torch.Tensor) -> bool:
        total_grad.add_(piece[:-1])
        state["step_loss"] += piece[-1].item()
        bar.update(1)
        if k not in last:
            return True
        state["used"] += 1
        total, state["step_loss"] = state["step_loss"], 0.0
        state["loss_max"] = max(state["loss_max"], total)
        return not (config.importance == "diff_pruning" and total < config.threshold * state["loss_max"])

    try:
        distributed.reduce_in_order(len(pieces), compute, consume, numel + 1)
    finally:
        bar.close()
        den.zero_grad(set_to_none=True)
        den.train(was)
    grads, offset = {}, 0
    for k, p in params.items():
        grads[k] = total_grad[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    return grads, state["used"]


def _class_scores(deps: Dependencies, den: Denoiser, grads: dict[str, torch.Tensor] | None) -> np.ndarray:
    """Importance of every label class: per parameter slice, normalised by the parameter's mean slice score."""
    scores = np.zeros(len(deps.cls))
    params = dict(den.named_parameters())
    for name, dims in deps.params.items():
        p = params.get(name)
        if p is None or p.dim() == 0:
            continue
        w = p.detach().double()
        per = (w * grads[name].double()).abs() if grads is not None else w * w
        for d, arr in enumerate(dims):
            other = [i for i in range(w.dim()) if i != d]
            s = per.sum(dim=other).numpy() if other else per.numpy()
            mean = s.mean()
            if mean > 0:
                np.add.at(scores, arr, s / mean)
    return scores


# -- selection -------------------------------------------------------------------------------------------


def _bundles(units: list[Unit], scores: np.ndarray, round_to: int) -> list[list[Unit]]:
    """Units of one space grouped, least important first, so that a whole bundle keeps widths multiples of
    ``round_to`` (when the space's width and unit size allow)."""
    spaces: dict[tuple, list[Unit]] = {}
    for u in units:
        spaces.setdefault(u.space, []).append(u)
    out = []
    for members in spaces.values():
        members.sort(key=lambda u: scores[u.classes].sum())
        # units of one space take the same number of indices from each dimension they touch: bundle enough of
        # them that every one of those dimensions shrinks by a multiple of round_to
        counts = [len(ix) for dd in members[0].params.values() for ix in dd.values()]
        step = math.lcm(*(round_to // math.gcd(c, round_to) for c in counts)) if counts else 1
        if step > len(members) // 2:
            step = 1
        out += [members[i:i + step] for i in range(0, len(members) - len(members) % step, step)]
    return out


def _select(deps: Dependencies, units: list[Unit], scores: np.ndarray, config: PruneConfig) -> np.ndarray:
    """Greedy global removal by importance per MAC (or parameter) until the target is met; bool class mask."""
    bundles = _bundles(units, scores, config.round_to)
    params_of = {name: [len(d) for d in dims] for name, dims in deps.params.items()}
    if config.measure == "params":
        def unit_params(u: Unit) -> float:
            return float(sum(math.prod(n for j, n in enumerate(params_of[p]) if j != d) * len(ix)
                             for p, dd in u.params.items() for d, ix in dd.items()))

        cost = [sum(unit_params(u) for u in b) for b in bundles]
        before = float(deps.kept_params(np.zeros(len(deps.cls), dtype=bool)))
    else:
        cost = [float(sum(u.macs for u in b)) for b in bundles]
        before = deps.kept_macs(np.zeros(len(deps.cls), dtype=bool))
    value = [float(sum(scores[u.classes].sum() for u in b)) for b in bundles]
    order = sorted(range(len(bundles)), key=lambda i: value[i] / max(cost[i], 1e-9))
    removed = np.zeros(len(deps.cls), dtype=bool)
    gone: dict[tuple[str, int], np.ndarray] = {}
    goal = config.target * before
    estimate = 0.0
    i = 0
    while i < len(order):
        b = bundles[order[i]]
        i += 1
        ok = True
        staged: dict[tuple[str, int], np.ndarray] = {}
        for u in b:
            for p, dd in u.params.items():
                for d, ix in dd.items():
                    key = (p, d)
                    mask = staged.get(key, gone.get(key, np.zeros(params_of[p][d], dtype=bool))).copy()
                    mask[ix] = True
                    if (~mask).sum() < max(1, math.ceil(config.min_keep * params_of[p][d])):
                        ok = False
                    staged[key] = mask
        if not ok:
            continue
        gone.update(staged)
        for u in b:
            removed[u.classes] = True
        estimate += cost[order[i - 1]]
        if estimate >= goal:
            after = deps.kept_params(removed) if config.measure == "params" else deps.kept_macs(removed)
            saved = before - after
            if saved >= goal:
                break
            estimate = saved
    return removed


# -- rewrite ---------------------------------------------------------------------------------------------


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod.register_buffer(attr, value, persistent=attr not in getattr(mod, "_non_persistent_buffers_set", set()))


def _builtin_attrs(module: nn.Module) -> dict[str, Any]:
    """Attributes of torch.nn layers that follow their parameters' shapes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if module.groups > 1 and not module.transposed and w.shape[1] == 1 and module.groups == module.in_channels:
            return {"in_channels": int(w.shape[0]) // (module.out_channels // module.in_channels),
                    "out_channels": int(w.shape[0]), "groups": int(w.shape[0]) // (module.out_channels //
                                                                                  module.in_channels)}
        cin, cout = (w.shape[0], w.shape[1] * module.groups) if module.transposed else \
            (w.shape[1] * module.groups, w.shape[0])
        return {"in_channels": int(cin), "out_channels": int(cout)}
    if isinstance(module, nn.Linear):
        return {"in_features": int(module.weight.shape[1]), "out_features": int(module.weight.shape[0])}
    if isinstance(module, nn.GroupNorm) and module.weight is not None:
        size = module.num_channels // module.num_groups
        return {"num_channels": int(module.weight.shape[0]), "num_groups": int(module.weight.shape[0]) // size}
    if isinstance(module, nn.Embedding):
        return {"embedding_dim": int(module.weight.shape[1]), "num_embeddings": int(module.weight.shape[0])}
    return {}


def _stack(node) -> list[str]:
    """Qualified names of the modules running when ``node`` was recorded, outermost first."""
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def _is_reshape(node) -> bool:
    return hasattr(node.target, "overloadpacket") and node.target.overloadpacket.__name__ in _RESHAPES


def _size_changes(deps: Dependencies, removed: np.ndarray) -> dict[str, dict[str, dict[int, set[int]]]]:
    """Per module, old -> new widths from three sources, in the order they are trusted: the literal sizes of its
    own reshapes that shrink (``literal``), the tensors entering it (``in``, unchanged ones too: an attribute
    that holds an input width the pruning kept must stay) and those leaving it (``out``)."""
    gm = deps.graph.gm
    labels = deps.labels
    stacks = {n.name: _stack(n) for n in gm.graph.nodes}
    out: dict[str, dict[str, dict[int, set[int]]]] = {}

    def note(module: str, kind: str, dims, changed_only: bool) -> None:
        for arr in dims:
            if deps.pinned[arr].all():  # a width no pruning can change (spatial sizes, the batch)
                continue
            new = int((~removed[arr]).sum())
            if new != len(arr) or not changed_only:
                out.setdefault(module, {}).setdefault(kind, {}).setdefault(len(arr), set()).add(new)

    for n in gm.graph.nodes:
        lab = labels.get(n.name)
        if not isinstance(lab, list) or n.op == "get_attr":  # parameters are not a module's inputs
            continue
        mine = stacks.get(n.name, [])
        if mine and n.op == "call_function" and _is_reshape(n):
            note(mine[-1], "literal", lab, True)
        for user in n.users:
            theirs = stacks.get(user.name, [])
            for m in theirs:
                if m not in mine:  # the tensor enters module m
                    note(m, "in", lab, False)
            for m in mine:
                if m not in theirs:  # the tensor leaves module m
                    note(m, "out", lab, True)
    return out


def _fix_attrs(den: Denoiser, deps: Dependencies, removed: np.ndarray, unsure: list[str]) -> dict[str, dict[str, int]]:
    """Update integer attributes that hold a width the pruning changed; returns them by module (``unsure``
    collects attributes whose width shrinks differently in different places: left alone)."""
    changes: dict[str, dict[str, int]] = {}
    for name, module in den.named_modules():
        for k, v in _builtin_attrs(module).items():
            if getattr(module, k) != v:
                setattr(module, k, v)
                changes.setdefault(name, {})[k] = v
    for name, sources in _size_changes(deps, removed).items():
        module = den.get_submodule(name) if name else den
        if _builtin_attrs(module) or isinstance(module, Denoiser) or not any(
                old not in new for m in sources.values() for old, new in m.items()):
            continue
        for k, v in list(vars(module).items()):
            if isinstance(v, bool) or not isinstance(v, int):
                continue
            for kind in ("literal", "in", "out"):
                new = sources.get(kind, {}).get(v)
                if new is None:
                    continue
                if len(new) > 1:  # ambiguous: left as it is; the check against the masked model decides
                    unsure.append(f"{name}.{k}")
                    break
                value = next(iter(new))
                if value != v:
                    setattr(module, k, value)
                    changes.setdefault(name, {})[k] = value
                break
    return changes


def apply_removal(den: Denoiser, deps: Dependencies, removed: np.ndarray) -> dict[str, Any]:
    """Slice every parameter that carries a removed class and fix the module attributes; returns the record
    parts (``shapes``, ``attrs``)."""
    masks = deps.masks(removed)
    state = dict(den.named_parameters()) | dict(den.named_buffers())
    shapes = {}
    for name, keep in masks.items():
        w = state[name].detach()
        for d, k in enumerate(keep):
            w = w.index_select(d, torch.from_numpy(np.flatnonzero(k)))
        _set_param(den, name, w.clone().contiguous())
        shapes[name] = list(w.shape)
    unsure: list[str] = []
    attrs = _fix_attrs(den, deps, removed, unsure)
    return {"shapes": shapes, "attrs": attrs, "unsure": unsure}


def masked_copy(den: Denoiser, deps: Dependencies, removed: np.ndarray) -> Denoiser:
    """A copy of ``den`` with the removed slices set to zero (what the pruned model must equal)."""
    twin = den.copy()
    state = dict(twin.named_parameters()) | dict(twin.named_buffers())
    with torch.no_grad():
        for name, keep in deps.masks(removed).items():
            w = state[name]
            for d, k in enumerate(keep):
                idx = torch.from_numpy(np.flatnonzero(~k))
                if len(idx):
                    w.index_fill_(d, idx, 0.0)
    return twin


def _failing_module(small: Denoiser, reference: Denoiser, example: tuple) -> str | None:
    """None when the pruned model runs and equals the masked one; else the innermost module that failed
    (``""``: it ran but the numbers differ)."""
    from diffpress.graph.capture import _module_trail

    with torch.no_grad():
        want = reference(*example)
        with _module_trail(small) as trail:
            try:
                got = small(*example)
            except Exception:  # noqa: BLE001 - any failure names the module that raised it
                return trail[-1] if trail else ""
    err = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12))
    return None if err < 1e-4 else ""


def _module_classes(deps: Dependencies, module: str) -> np.ndarray:
    """Label classes of the reshapes a module runs itself, or of every tensor inside it when it runs none."""
    own, inside = [], []
    for n in deps.graph.gm.graph.nodes:
        stack = _stack(n)
        lab = deps.labels.get(n.name)
        if module not in stack or not isinstance(lab, list) or not lab:
            continue
        inside += lab + [a for arg in n.all_input_nodes if arg.op != "get_attr" for a in deps.labels.get(arg.name, [])]
        if stack[-1] == module and _is_reshape(n):
            own += lab + [a for arg in n.all_input_nodes for a in deps.labels.get(arg.name, [])]
    chosen = own or inside
    return np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _select_runnable(den: Denoiser, deps: Dependencies, units: list[Unit], scores: np.ndarray, config: PruneConfig,
                     skipped: list[dict[str, str]]) -> tuple[np.ndarray, list[Unit]]:
    """Select, then check on a copy that the smaller model runs and equals the masked original. Model code may
    size a tensor from another tensor's width (which the graph records as a literal); a module that fails
    keeps the widths of its own reshapes (or all of its widths), and the selection runs again."""
    example = den.example_inputs(2)
    for _ in range(12):
        removed = _select(deps, units, scores, config)
        small = den.copy()
        apply_removal(small, deps, removed)
        failed = _failing_module(small, masked_copy(den, deps, removed), example)
        if failed is None:
            return removed, units
        if not failed:
            raise DiffpressError("prune: the smaller model runs but does not equal the original with the same "
                                 "channels set to zero; protect the layers involved (skip: [...]) and report "
                                 "this model")
        bad = _module_classes(deps, failed)
        keep = [u for u in units if not np.isin(u.classes, bad).any()]
        if len(keep) == len(units):
            raise DiffpressError(f"prune: module {failed!r} fails after pruning and no unit can be held back to "
                                 f"fix it; protect it (skip: ['{failed}*'])")
        skipped.append({"name": failed, "reason": "its code sizes tensors from widths the graph records as "
                        f"literals: {len(units) - len(keep)} units through it kept", "rule": "pass"})
        units = keep
    raise DiffpressError("prune: the pruned model kept failing; protect the modules named in the report")


def _protected(den: Denoiser, graph, config: PruneConfig) -> tuple[set[str], list[dict[str, str]]]:
    sel = select_layers(den, graph, skip_roles=config.skip_roles, skip=config.skip,
                        types=(nn.Linear, nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d),
                        ops=("linear", "conv2d", "conv1d", "conv_transpose2d"))
    keep = [s for s in sel.skipped if s["rule"] in ("role", "glob")]
    return {s["name"] for s in keep}, keep


def prune_(den: Denoiser, config: PruneConfig | None = None, calibration: CalibrationSet | None = None,
           progress: bool = True) -> PruneReport:
    """Prune ``den`` in place (see the module docstring); returns a :class:`PruneReport`.

    >>> import diffpress
    >>> den = diffpress.load("digits-cond-unet")
    >>> r = diffpress.prune_(den, PruneConfig(target=0.3, importance="magnitude"), progress=False)
    >>> 0.25 < 1 - r.macs_after / r.macs_before < 0.4
    True
    """
    import time

    config = config or PruneConfig()
    start = time.perf_counter()
    if config.importance != "magnitude" and calibration is None:
        raise DiffpressError(f"importance {config.importance!r} needs calibration data (the trajectory's points); "
                             "pass a CalibrationSet or use importance: magnitude")
    teacher = den.copy() if config.recover is not None else None
    graph = capture(den, batch=2)
    deps = dependencies(graph)
    protected, skipped = _protected(den, graph, config)
    kinds = {"channels": ("channels", "groups"), "heads": ("heads",)}
    allowed = {k for g in config.granularity for k in kinds[g]}
    units = [u for u in deps.units if u.kind in allowed and
             not any(p.rpartition(".")[0] in protected for p in u.params)]
    if not units:
        raise DiffpressError("prune: no removable channel, group or head in this model with these settings "
                             f"(granularity {config.granularity}, skip_roles {config.skip_roles}, skip {config.skip})")
    grads, used = (None, 0)
    t_importance = time.perf_counter()
    if config.importance != "magnitude":
        grads, used = _gradients(den, calibration, config, progress)
    t_importance = time.perf_counter() - t_importance
    scores = _class_scores(deps, den, grads)
    removed, units = _select_runnable(den, deps, units, scores, config, skipped)
    zero = np.zeros(len(deps.cls), dtype=bool)
    per = graph.batch  # MACs are reported per sample
    macs_before, params_before = deps.kept_macs(zero) / per, sum(p.numel() for p in den.parameters())
    parts = apply_removal(den, deps, removed)
    counts = {k: 0 for k in ("channels", "groups", "heads")}
    for u in units:
        if removed[u.classes].all():
            counts[u.kind] += 1
    layers = [{"name": n, "shape": s} for n, s in parts["shapes"].items()]
    record = {"pass": "prune", "config": asdict(config), **parts}
    den.compression.append(record)
    report = PruneReport(macs_before, deps.kept_macs(removed) / per, params_before,
                         sum(p.numel() for p in den.parameters()), counts,
                         {k: sum(u.kind == k for u in units) for k in counts},
                         max(u.macs for u in units) / per, layers, config.importance, used, skipped=skipped)
    if teacher is not None:
        report.recovery = recover(den, teacher, calibration, config.recover, progress=progress)
    report.seconds, report.importance_seconds = time.perf_counter() - start, t_importance
    record["report"] = {"macs_before": report.macs_before, "macs_after": report.macs_after,
                        "params_before": report.params_before, "params_after": report.params_after,
                        "units_removed": counts, "recovery": report.recovery}
    return report


def restore_prune(den: Denoiser, record: dict[str, Any]) -> None:
    """Give a freshly built architecture the pruned shapes (values come from the saved state) and widths."""
    for name, shape in record["shapes"].items():
        _set_param(den, name, torch.zeros(shape))
    for name, attrs in record["attrs"].items():
        module = den.get_submodule(name) if name else den
        for k, v in attrs.items():
            setattr(module, k, v)
    den.compression.append(record)


register(PassSpec(
    "prune", PruneConfig, lambda den, config, calibration, progress: prune_(den, config, calibration,
                                                                           progress=progress),
    restore_prune, once=True,
    needs_calibration=lambda config: config.importance != "magnitude" or config.recover is not None,
    description="structural pruning: channels, GroupNorm groups and attention heads removed by importance per MAC, "
                "groups found on the captured graph",
))
