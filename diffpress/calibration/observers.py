"""Activation observers: per-layer, per-timestep statistics of the layers to quantize.

For every (layer, timestep) the observer keeps the running min / max and a bounded random sample of
values, enough for percentile and MSE-optimal range rules, for the layer's input and, optionally, its
output before the bias (what an integer kernel's requantization sees). Layers whose input is a
skip-concat are observed per part (channels ``[:split]`` and ``[split:]``, and each part's partial
product) so the two parts can get their own ranges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

import diffpress.distributed as distributed
from diffpress.calibration.dataset import CalibrationSet
from diffpress.runtime import hooks

if TYPE_CHECKING:
    from diffpress.denoiser import Denoiser


@dataclass
class StepStats:
    """Statistics of one activation at one timestep: min, max, count and a uniform random sample of at most
    ``max_samples`` values. The sample keeps the values with the smallest random keys (bottom-k sampling), so it
    does not depend on the order the batches come in: statistics merged from several processes equal a single
    process's.

    >>> g = torch.Generator().manual_seed(0)
    >>> a, b, both = StepStats(), StepStats(), StepStats()
    >>> x, y = torch.arange(10.0), -torch.arange(10.0)
    >>> a.update(x, 4, g.manual_seed(1)); b.update(y, 4, g.manual_seed(2))
    >>> both.update(y, 4, g.manual_seed(2)); both.update(x, 4, g.manual_seed(1))
    >>> a.merge(b); torch.equal(a.samples, both.samples), (a.min, a.max, a.count)
    (True, (-9.0, 9.0, 20))
    """

    min: float = float("inf")
    max: float = float("-inf")
    count: int = 0
    samples: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    keys: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))

    def update(self, x: torch.Tensor, max_samples: int, gen: torch.Generator) -> None:
        x = x.detach().float().flatten()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.count += x.numel()
        take = min(x.numel(), max_samples)
        picked = x[torch.randint(0, x.numel(), (take,), generator=gen)]
        self._keep(picked, torch.rand(take, generator=gen, dtype=torch.float64), max_samples)

    def merge(self, other: "StepStats", max_samples: int | None = None) -> None:
        """Fold ``other`` (the same activation and timestep, other batches) into this one."""
        self.min, self.max, self.count = min(self.min, other.min), max(self.max, other.max), self.count + other.count
        self._keep(other.samples, other.keys, max_samples or max(len(self.samples), len(other.samples)))

    def _keep(self, values: torch.Tensor, keys: torch.Tensor, max_samples: int) -> None:
        keys = torch.cat([self.keys, keys])
        order = torch.sort(keys, stable=True).indices[:max_samples]  # canonical: ascending keys
        self.samples, self.keys = torch.cat([self.samples, values])[order], keys[order]


# layer name -> "in" / "out" -> part index (0, or 0/1 for split inputs) -> timestep -> StepStats
ActivationStats = dict[str, dict[str, list[dict[float, StepStats]]]]


def _partial_products(module: nn.Module, parts: list[torch.Tensor], split: int | None) -> list[torch.Tensor]:
    """Each input part times its slice of the weight, without bias (Linear or Conv2d)."""
    if isinstance(module, nn.Linear):
        return [torch.matmul(parts[0], module.weight.t())]
    ws = [module.weight] if split is None else [module.weight[:, :split], module.weight[:, split:]]
    return [torch.nn.functional.conv2d(p, w, None, module.stride, module.padding, module.dilation, module.groups)
            for p, w in zip(parts, ws)]


def observe(
    denoiser: "Denoiser",
    calibration: CalibrationSet,
    layers: dict[str, int | None],
    *,
    outputs: bool = False,
    batch_size: int = 32,
    max_samples: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> ActivationStats:
    """Run ``denoiser`` over ``calibration`` and record the input statistics of ``layers`` per timestep (read
    from the denoiser's run-time context).

    ``layers`` maps module names (relative to ``denoiser``) to a concat split (channels of the first
    part) or ``None``. With ``outputs=True`` the pre-bias outputs (per part) are recorded too; those
    layers must be ``nn.Linear`` or ``nn.Conv2d``.

    >>> import diffpress
    >>> from diffpress.calibration import collect, TimestepPolicy
    >>> den = diffpress.load("digits-unet")
    >>> cs = collect(den, num_samples=2, steps=4, policy=TimestepPolicy("all"), progress=False)
    >>> stats = observe(den, cs, {"model.conv_in": None}, progress=False)
    >>> sorted(stats["model.conv_in"]["in"][0])  # the four DDIM timesteps
    [0.0, 250.0, 500.0, 750.0]
    """
    gen = torch.Generator()
    stats: ActivationStats = {
        name: {kind: [{} for _ in range(1 if split is None else 2)] for kind in (("in", "out") if outputs else ("in",))}
        for name, split in layers.items()}
    runtime = denoiser.runtime

    def make_hook(name: str, split: int | None):
        def hook(module, args):
            x = args[0]
            t = float(runtime.t.reshape(-1)[0])  # a batch holds one timestep (CalibrationSet.batches)
            parts = [x] if split is None else [x[:, :split], x[:, split:]]
            record = {"in": parts}
            if outputs:
                record["out"] = _partial_products(module, parts, split)
            for kind, values in record.items():
                for value, store in zip(values, stats[name][kind]):
                    store.setdefault(t, StepStats()).update(value, max_samples, gen)
        return hook

    from diffpress.denoiser import eval_mode

    specs = [(denoiser.get_submodule(name), "pre", make_hook(name, split)) for name, split in layers.items()]
    rank, size = distributed.world()
    with hooks(specs), runtime.using(mode="calibrate"), eval_mode(denoiser), torch.no_grad(), \
            tqdm(total=len(calibration), desc="observing activations", disable=not progress or rank > 0,
                 leave=False) as bar:
        for i, (lo, hi) in enumerate(calibration.ranges(batch_size)):  # streamed: a lazy set stays on disk
            if i % size == rank:  # under torchrun: this rank's share of the batches
                gen.manual_seed(seed * 1_000_003 + i)  # per batch: the same draws whichever rank runs it
                denoiser(*calibration.batch(lo, hi))
            bar.update(hi - lo)
    return _merged(distributed.gather(stats), max_samples)


def _merged(parts: list[ActivationStats], max_samples: int) -> ActivationStats:
    """Statistics of several ranks combined, each activation's timesteps in sampling order (descending t): the
    same whatever the number of ranks."""
    out = parts[0]
    for name, kinds in out.items():
        for kind, stores in kinds.items():
            for j, store in enumerate(stores):
                for other in parts[1:]:
                    for t, st in other[name][kind][j].items():
                        if t in store:
                            store[t].merge(st, max_samples)
                        else:
                            store[t] = st
                stores[j] = dict(sorted(store.items(), key=lambda kv: -kv[0]))
    return out
