"""Block reconstruction (BRECQ with AdaRound): learn how each quantized weight rounds, block by block.

Config only for now; the pass follows.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffpress.errors import DiffpressError


@dataclass
class ReconstructConfig:
    """Settings of the optional reconstruction step of :func:`diffpress.quantize_`.

    >>> ReconstructConfig(iters=200).iters
    200
    >>> ReconstructConfig(time_budget=-1)
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: reconstruct.time_budget: must be positive seconds or null, got -1
    """

    iters: int = 500  # optimisation steps per block (fewer when the time budget runs short)
    time_budget: float | None = 120.0  # seconds for the whole reconstruction; None: no limit
    samples: int = 256  # calibration points used (drawn evenly over the calibration set)
    batch_size: int = 32
    lr: float = 1e-3  # Adam on the rounding variables
    round_weight: float = 0.01  # lambda of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # regulariser temperature, annealed start -> end
    warmup: float = 0.2  # fraction of the steps without the regulariser
    granularity: str = "block"  # "block" (BRECQ) or "layer" (AdaRound)

    def __post_init__(self) -> None:
        self.beta = tuple(float(b) for b in self.beta)
        if self.granularity not in ("block", "layer"):
            raise DiffpressError(f"reconstruct.granularity: {self.granularity!r} is not allowed; allowed: block, layer")
        for key in ("iters", "samples", "batch_size"):
            if getattr(self, key) < 1:
                raise DiffpressError(f"reconstruct.{key}: must be >= 1, got {getattr(self, key)}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise DiffpressError(f"reconstruct.time_budget: must be positive seconds or null, got {self.time_budget}")
        if not 0 <= self.warmup < 1:
            raise DiffpressError(f"reconstruct.warmup: must be in [0, 1), got {self.warmup}")
        if len(self.beta) != 2:
            raise DiffpressError(f"reconstruct.beta: must be [start, end], got {list(self.beta)}")
