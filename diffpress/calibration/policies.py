"""Timestep policies: which steps of a sampling trajectory calibration keeps.

- ``uniform``: ``count`` steps evenly spaced over the trajectory (Q-Diffusion's uniform interval);
- ``all``: every step;
- ``normal``: ``count`` steps drawn around a point of the trajectory (PTQ4DM's normal distribution
  over timesteps: ``mean`` and ``std`` are fractions of the trajectory, 0 = first step / pure noise);
- ``steps``: an explicit list of step indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffpress.errors import DiffpressError

KINDS = ("uniform", "all", "normal", "steps")


@dataclass
class TimestepPolicy:
    """Which trajectory steps to keep.

    >>> TimestepPolicy("uniform", count=5).select(50)
    [0, 12, 24, 37, 49]
    >>> TimestepPolicy("steps", steps=[0, 10, 40]).select(50)
    [0, 10, 40]
    """

    kind: str = "uniform"
    count: int = 10
    mean: float = 0.4
    std: float = 0.4
    steps: list[int] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffpressError(f"unknown timestep policy {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.kind in ("uniform", "normal") and self.count < 1:
            raise DiffpressError(f"policy {self.kind!r} needs count >= 1, got {self.count}")
        if self.kind == "steps" and not self.steps:
            raise DiffpressError("policy 'steps' needs a non-empty list of step indices")
        if self.kind == "normal" and self.std <= 0:
            raise DiffpressError(f"policy 'normal' needs std > 0, got {self.std}")

    def select(self, num_steps: int) -> list[int]:
        """Sorted, distinct step indices in ``[0, num_steps)``."""
        if self.kind == "all":
            return list(range(num_steps))
        if self.kind == "uniform":
            n = min(self.count, num_steps)
            return sorted({int(round(v)) for v in np.linspace(0, num_steps - 1, n)})
        if self.kind == "steps":
            bad = [s for s in self.steps if not 0 <= s < num_steps]
            if bad:
                raise DiffpressError(f"steps {bad} are outside the trajectory (0..{num_steps - 1})")
            return sorted(set(int(s) for s in self.steps))
        # normal: draw distinct steps from a normal over the trajectory, truncated to [0, num_steps)
        n = min(self.count, num_steps)
        rng = np.random.default_rng(self.seed)
        chosen: set[int] = set()
        while len(chosen) < n:
            v = rng.normal(self.mean * (num_steps - 1), self.std * (num_steps - 1), size=4 * n)
            for s in np.clip(np.round(v), 0, num_steps - 1).astype(int):
                if len(chosen) < n:
                    chosen.add(int(s))
        return sorted(chosen)
