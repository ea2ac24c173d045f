"""The run-time context a denoiser carries, and the one helper that installs and removes module hooks.

Every :class:`~diffpress.Denoiser` owns one :class:`RunContext`. The sampler resets it at the start of
each sampling run and sets the step index before each step; the denoiser's forward sets the timestep.
Modules that passes install (timestep-grouped quantizers, cache hooks) hold a reference to it and read
it; nothing else is global. The mode says how those modules compute:

- ``evaluate`` (the default): ordinary inference, fake quantization through ``quantized_decomposed`` ops
  (what ``torch.onnx`` turns into QuantizeLinear / DequantizeLinear);
- ``calibrate``: inference while a pass collects statistics;
- ``export``: tracing for an exporter;
- ``plain``: the same numbers as ``evaluate``, as plain round/clamp arithmetic (for artifacts that must
  load where the quantized ops are not registered, e.g. TorchScript);
- ``straight_through``: fake quantization with a straight-through gradient (learning the rounding);
- ``literal``: the same numbers as ``evaluate`` with the activation scales as Python numbers (one timestep
  group, ``group``), int8 activation storage and ``F.linear``: the pattern ExecuTorch's XNNPACK delegate
  lowers to integer kernels (see :mod:`diffpress.exporters.executorch`).

``group`` fixes the timestep group of grouped quantizers (an export makes one program per group);
``None`` picks it from ``t``.

>>> ctx = RunContext()
>>> ctx.reset(steps=50); ctx.at_step(0); ctx.step, ctx.steps, ctx.runs
(0, 50, 1)
>>> ctx.end(); ctx.step, ctx.steps
(None, None)
>>> with ctx.using(mode="plain"):
...     ctx.mode
'plain'
>>> ctx.mode
'evaluate'
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from diffpress.errors import check_allowed

MODES = ("evaluate", "calibrate", "export", "plain", "straight_through", "literal")


class RunContext:
    """Where a denoiser is in its sampling run: ``t`` (the timestep tensor of the current call), ``step``
    (index of the running step, ``None`` outside a sampler), ``steps`` (the run's step count), ``runs``
    (sampling runs started, so hooks can tell a new trajectory from the last) and ``mode``."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None
        self.step: int | None = None
        self.steps: int | None = None
        self.runs = 0
        self.mode = "evaluate"
        self.group: int | None = None

    def reset(self, steps: int | None = None) -> None:
        """A new sampling run starts (the sampler calls this before its first step)."""
        self.t, self.step, self.steps = None, None, steps
        self.runs += 1

    def at_step(self, step: int) -> None:
        """The sampler is about to evaluate step ``step`` of ``steps``."""
        self.step = step

    def end(self) -> None:
        """The sampling run is over (or failed): outside a sampler there is no step index."""
        self.t, self.step, self.steps = None, None, None

    @contextlib.contextmanager
    def using(self, **fields: Any) -> Iterator["RunContext"]:
        """Set some fields (``mode``, ``t``, ``step`` ...) for the duration of a block, then restore them."""
        if "mode" in fields:
            check_allowed("mode", fields["mode"], MODES)
        unknown = set(fields) - {"t", "step", "steps", "mode", "group"}
        if unknown:
            raise TypeError(f"unknown run-context fields {sorted(unknown)}")
        before = {k: getattr(self, k) for k in fields}
        for k, v in fields.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in before.items():
                setattr(self, k, v)

    def __deepcopy__(self, memo: dict) -> "RunContext":
        # a copied denoiser gets its own context (its modules point to the copy, through ``memo``); the
        # timestep of the last call is transient and may be a tracing tensor (after an export): not copied
        new = RunContext()
        new.step, new.steps, new.runs, new.mode, new.group = self.step, self.steps, self.runs, self.mode, self.group
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        t = None if self.t is None else self.t.reshape(-1)[:1].tolist()
        return f"RunContext(mode={self.mode}, step={self.step}, steps={self.steps}, runs={self.runs}, t={t})"


Hook = tuple[nn.Module, str, Callable]


@contextlib.contextmanager
def hooks(specs: Iterable[Hook], *, with_kwargs: bool = False) -> Iterator[list]:
    """Install module hooks for the duration of a block, and remove every one of them however it ends.

    Each spec is ``(module, kind, fn)`` with ``kind`` ``"pre"`` (``register_forward_pre_hook``) or
    ``"post"`` (``register_forward_hook``).

    >>> lin, seen = nn.Linear(2, 2), []
    >>> with hooks([(lin, "pre", lambda m, args: seen.append(args[0].shape))]):
    ...     _ = lin(torch.zeros(3, 2))
    >>> _ = lin(torch.zeros(1, 2))  # removed
    >>> seen
    [torch.Size([3, 2])]
    """
    handles = []
    try:
        for module, kind, fn in specs:
            check_allowed("hook kind", kind, ("pre", "post"))
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn, with_kwargs=with_kwargs) if with_kwargs else register(fn))
        yield handles
    finally:
        for h in handles:
            h.remove()
