"""Short recovery after pruning: distil the original model into the pruned one on calibration trajectories.

The student sees the teacher's trajectory points ``(x_t, t, cond)`` and learns the teacher's output (MSE), and
optionally the outputs of named modules whose shapes the pruning kept (``features``, globs). Training stops at
``time_budget`` seconds or ``steps``; the learning rate follows a cosine over the budget (after a short
warm-up); the state with the lowest MSE on held-out calibration points is kept.

>>> import diffpress
>>> from diffpress.compress.prune import PruneConfig
>>> den = diffpress.load("digits-dit")
>>> cal = diffpress.calibrate(den, num_samples=4, steps=4, progress=False)
>>> cfg = PruneConfig(target=0.3, importance="magnitude", recover={"time_budget": 5, "steps": 20})
>>> r = diffpress.prune_(den, cfg, cal, progress=False)
>>> r.recovery["best"] <= r.recovery["initial"]
True
"""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

import diffpress.distributed as distributed
from diffpress.errors import DiffpressError


@dataclass
class RecoverConfig:
    """``time_budget`` seconds and at most ``steps`` optimizer steps of AdamW at ``lr`` (cosine decay,
    ``warmup`` steps), ``batch_size`` points a step, ``holdout`` fraction of points for choosing the best state
    (checked every ``eval_every`` steps), ``features``: module-name globs whose outputs are distilled too."""

    time_budget: float = 120.0
    steps: int = 100_000
    lr: float = 3e-4
    warmup: int = 20
    batch_size: int = 32
    holdout: float = 0.1
    eval_every: int = 25
    features: list[str] = field(default_factory=list)
    feature_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if float(self.time_budget) <= 0 or int(self.steps) < 1:
            raise DiffpressError("recover: time_budget must be > 0 seconds and steps >= 1")
        if not 0.0 < float(self.holdout) < 1.0:
            raise DiffpressError(f"recover.holdout: {self.holdout} is not a fraction in (0, 1)")


def _feature_hooks(module: torch.nn.Module, patterns: list[str], store: dict[str, torch.Tensor]):
    handles = []
    for name, sub in module.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            handles.append(sub.register_forward_hook(
                lambda m, a, out, name=name: store.__setitem__(name, out if torch.is_tensor(out) else out[0])))
    return handles


def recover(student, teacher, calibration, config: RecoverConfig | None = None, progress: bool = True,
            checkpoints: tuple[float, ...] = ()) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` in place; returns the log (``steps``, ``seconds``, held-out MSE
    ``initial`` / ``best``, ``history``). ``checkpoints`` (seconds): the best state so far at each is kept in
    ``log["states"]`` (for measuring what shorter budgets buy in one run)."""
    config = config or RecoverConfig()
    if calibration is None or len(calibration) < 2:
        raise DiffpressError("recover: needs calibration points (at least 2) to distil on")
    n = len(calibration)
    g = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_hold = max(1, int(round(config.holdout * n)))
    hold, train = sorted(perm[:n_hold]), perm[n_hold:] or perm[:1]

    t_store: dict[str, torch.Tensor] = {}
    s_store: dict[str, torch.Tensor] = {}
    handles = _feature_hooks(teacher, config.features, t_store) + _feature_hooks(student, config.features, s_store)
    teacher.eval()
    try:
        with torch.no_grad():
            hx, ht, hc = calibration.rows(hold)
            h_target = teacher(hx, ht, hc)

        def heldout() -> float:
            student.eval()
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(student(hx, ht, hc), h_target))

        initial = best = heldout()
        best_state = copy.deepcopy(student.state_dict())
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
        history = [(0.0, 0, initial)]
        states: dict[float, dict] = {}
        pending = sorted(checkpoints)
        start = time.perf_counter()
        step = 0
        bar = tqdm(total=int(config.time_budget), desc="prune: recovery", unit="s", disable=not progress, leave=False)
        order: list[int] = []
        while step < config.steps:
            elapsed = time.perf_counter() - start
            while pending and elapsed >= pending[0]:
                states[pending.pop(0)] = copy.deepcopy(best_state)
            if elapsed >= config.time_budget:
                break
            frac = min(1.0, elapsed / config.time_budget)
            warm = min(1.0, (step + 1) / max(1, config.warmup))
            for group in opt.param_groups:
                group["lr"] = config.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
            if len(order) < config.batch_size:
                order += torch.randperm(len(train), generator=g).tolist()
            batch, order = [train[i] for i in order[:config.batch_size]], order[config.batch_size:]
            x, t, c = calibration.rows(batch)
            with torch.no_grad():
                target = teacher(x, t, c)
            student.train()
            loss = torch.nn.functional.mse_loss(student(x, t, c), target)
            for k, v in s_store.items():
                ref = t_store[k]
                if v.shape != ref.shape:
                    raise DiffpressError(f"recover.features: module {k!r} has output {tuple(v.shape)} in the pruned "
                                         f"model and {tuple(ref.shape)} in the original; pick modules whose output "
                                         "width the pruning kept")
                loss = loss + config.feature_weight * torch.nn.functional.mse_loss(v, ref) / \
                    ref.pow(2).mean().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % config.eval_every == 0:
                value = heldout()
                history.append((time.perf_counter() - start, step, value))
                if value < best:
                    best, best_state = value, copy.deepcopy(student.state_dict())
            bar.n = min(int(time.perf_counter() - start), int(config.time_budget))
            bar.set_postfix(loss=f"{loss.item():.4g}", best=f"{best:.4g}")
        bar.close()
        value = heldout()
        history.append((time.perf_counter() - start, step, value))
        if value < best:
            best, best_state = value, copy.deepcopy(student.state_dict())
        for p in pending:
            states[p] = copy.deepcopy(best_state)
        student.load_state_dict(best_state)
        student.eval()
    finally:
        for h in handles:
            h.remove()
    log = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "initial": initial, "best": best,
           "history": [[round(s, 1), k, v] for s, k, v in history]}
    # the clock sets the learning rate and the stop: under torchrun every rank keeps rank 0's result
    distributed.share_state(student)
    log = distributed.broadcast(log)
    if checkpoints:
        log["states"] = states
    return log
