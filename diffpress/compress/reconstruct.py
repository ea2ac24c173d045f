"""Block reconstruction (BRECQ with AdaRound): learn how each quantized weight rounds, block by block.

Round-to-nearest minimises each weight's own error, not the error of the layer's output. AdaRound
(Nagel et al., 2020) learns, per weight, whether to round up or down: ``w = s * clamp(floor(W/s) + h(V))``
with a rectified sigmoid ``h`` and a regulariser that pushes ``h`` to 0 or 1. BRECQ (Li et al., 2021)
optimises all layers of a block together against the block's full-precision output; Q-Diffusion runs it
on calibration data drawn from the whole sampling trajectory. Blocks are found on the module tree: a
layer's block is its deepest ancestor that is an element of an ``nn.ModuleList`` (a UNet resnet, a
transformer block); layers outside any such list are reconstructed alone.

The block's input comes from the quantized model (so a block also corrects the errors of the blocks
before it) and its target from the full-precision model on the same calibration point. A block whose
learned rounding does not beat round-to-nearest on the calibration data keeps round-to-nearest, and a
time budget bounds the step: blocks it does not reach keep round-to-nearest and are reported.
Only the integer weights change, so saving, reloading and export are unaffected. The budget bounds
the learning: each remaining block gets an equal share of what is left, measured from the start of its
data capture; the final check of a block can run a little past it, and bias correction is not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import diffpress.conditions as conditions
import diffpress.distributed as distributed
from diffpress.calibration.dataset import CalibrationSet
from diffpress.compress.quant import QuantConv2d, QuantLinear
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError, check_allowed, check_at_least
from diffpress.runtime import hooks


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
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("iters", "samples", "batch_size", "seed"):
            if not isinstance(getattr(self, key), int) or isinstance(getattr(self, key), bool):
                raise DiffpressError(f"reconstruct.{key}: expected an integer, got {getattr(self, key)!r}")
        for key in ("lr", "round_weight", "warmup", "time_budget"):
            value = getattr(self, key)
            if not (value is None and key == "time_budget") and (
                    not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
                raise DiffpressError(f"reconstruct.{key}: expected a finite number, got {value!r}")
        if self.lr <= 0 or self.round_weight < 0:
            raise DiffpressError(f"reconstruct: lr must be > 0 and round_weight >= 0, got {self.lr}, {self.round_weight}")
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in self.beta):
            raise DiffpressError(f"reconstruct.beta: must be two positive numbers [start, end], got {list(self.beta)}")
        self.beta = tuple(float(b) for b in self.beta)
        check_allowed("reconstruct.granularity", self.granularity, ("block", "layer"))
        check_at_least(self, 1, "iters", "samples", "batch_size", prefix="reconstruct.")
        if self.time_budget is not None and self.time_budget <= 0:
            raise DiffpressError(f"reconstruct.time_budget: must be positive seconds or null, got {self.time_budget}")
        if not 0 <= self.warmup < 1:
            raise DiffpressError(f"reconstruct.warmup: must be in [0, 1), got {self.warmup}")
        if len(self.beta) != 2:
            raise DiffpressError(f"reconstruct.beta: must be [start, end], got {list(self.beta)}")


class AdaRound(nn.Module):
    """Learnable rounding of one weight tensor onto a fixed symmetric grid.

    ``V`` starts where ``h(V)`` equals the fractional part of ``W/s``, so the soft weight starts at the
    float weight; :meth:`integers` rounds up where ``V >= 0``.

    >>> w = torch.tensor([[0.26, -0.74]]); s = torch.tensor([[0.5, 0.5]])
    >>> ar = AdaRound(w, s, qmax=7)
    >>> torch.allclose(ar(), w, atol=1e-6), ar.integers().tolist()  # soft start == W; rounds as nearest
    (True, [[1, -1]])
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, qmax: int):
        super().__init__()
        x = weight.detach().float() / scale
        self.register_buffer("floor", torch.floor(x))
        self.register_buffer("scale", scale.detach().float())
        self.qmax = qmax
        p = ((x - self.floor - self.GAMMA) / (self.ZETA - self.GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(p / (1 - p)))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.h(), -self.qmax, self.qmax) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def integers(self) -> torch.Tensor:
        return torch.clamp(self.floor + (self.v >= 0).float(), -self.qmax, self.qmax).to(torch.int8)


def _expanded_scale(scale: torch.Tensor, shape: torch.Size, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return scale.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    return scale.repeat_interleave(group_size, 1).reshape(shape)


def _float_parts(module: QuantLinear | QuantConv2d, original: nn.Module) -> list[torch.Tensor]:
    w = original.weight.detach()
    if isinstance(module, QuantConv2d) and module.split is not None:
        return [w[:, :module.split], w[:, module.split:]]
    return [w]


def _attach(module: QuantLinear | QuantConv2d, original: nn.Module) -> nn.ModuleList:
    qmax = 2 ** (module.bits - 1) - 1
    parts = _float_parts(module, original)
    names = ["weight_scale"] if isinstance(module, QuantLinear) else [f"weight_scale{i}" for i in range(len(parts))]
    module.rounding = nn.ModuleList(
        AdaRound(w, _expanded_scale(getattr(module, n), w.shape, module.group_size), qmax) for w, n in zip(parts, names))
    return module.rounding


def _detach(module: QuantLinear | QuantConv2d, keep: bool) -> None:
    """Write the learned integers into the module (``keep``) or drop them (round-to-nearest stays)."""
    if keep:
        names = ["weight_q"] if isinstance(module, QuantLinear) else [f"weight_q{i}" for i in range(len(module.rounding))]
        for name, ar in zip(names, module.rounding):
            getattr(module, name).copy_(ar.integers())
    module.rounding = None


def find_blocks(names: list[str], root: nn.Module, granularity: str = "block") -> list[tuple[str, list[str]]]:
    """Group layer names (in execution order) into reconstruction units: ``[(block_name, [layers])]``.

    A layer's block is its deepest proper ancestor that is an element of an ``nn.ModuleList`` and holds
    at least two layers (so ``to_out.0``, a one-layer list element, is not a block of its own).

    >>> net = nn.Module(); net.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))])
    >>> net.head = nn.Linear(2, 2)
    >>> find_blocks(["blocks.0.0", "blocks.0.1", "head"], net)
    [('blocks.0', ['blocks.0.0', 'blocks.0.1']), ('head', ['head'])]
    """
    blocks: dict[str, list[str]] = {}
    for name in names:
        block = name
        if granularity == "block":
            parts = name.split(".")
            for i in range(len(parts) - 2, 0, -1):
                candidate = ".".join(parts[:i + 1])
                if parts[i].isdigit() and isinstance(root.get_submodule(".".join(parts[:i])), nn.ModuleList) \
                        and _layer_count(root.get_submodule(candidate)) >= 2:
                    block = candidate
                    break
        blocks.setdefault(block, []).append(name)
    return list(blocks.items())


def _layer_count(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)) for m in module.modules())


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _first_tensor(out: Any) -> torch.Tensor:
    kind = type(out).__name__
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DiffpressError(f"cannot reconstruct a block that returns {kind} (a tensor, or a tuple / mapping whose "
                         "first value is a tensor, is needed); use ReconstructConfig(granularity='layer')")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _capture(model: Denoiser, block: str, data: list[tuple], what: str) -> list[Any]:
    """Run ``model`` on each calibration batch up to ``block``; keep its inputs or its output."""
    found: list[Any] = []
    module = model.get_submodule(block)

    def pre(mod, args, kwargs):
        found.append((_detached(args), _detached(kwargs)))
        raise _Stop

    def post(mod, args, kwargs, out):
        found.append(_first_tensor(out).detach())
        raise _Stop

    with hooks([(module, "pre", pre) if what == "inputs" else (module, "post", post)], with_kwargs=True):
        _run_until_stop(model, data)
    if len(found) != len(data):
        raise DiffpressError(f"block {block} ran {len(found)} times on {len(data)} batches (a block must run once "
                             "per denoiser call); use ReconstructConfig(granularity='layer')")
    return found


def _run_until_stop(model: Denoiser, data: list[tuple]) -> None:
    """Run ``model`` on each batch; a hook may end a pass early with ``_Stop``."""
    with torch.no_grad():
        for x, t, cond in data:
            try:
                model(x, t, cond)
            except _Stop:
                pass


def calibration_batches(calibration: CalibrationSet, samples: int, batch_size: int) -> list[tuple]:
    """About ``samples`` points spread over every timestep of the set, in single-timestep batches: an even
    stride through each batch, so every trajectory (and label) is represented; copies, so a lazily
    loaded set is not kept in memory whole."""
    keep = min(1.0, samples / len(calibration))
    out = []
    for x, t, cond in calibration.batches(batch_size):
        idx = torch.linspace(0, len(x) - 1, max(1, math.ceil(len(x) * keep))).round().long().unique()
        out.append((x[idx].clone(), t[idx].clone(), conditions.apply(lambda v: v[idx].clone(), cond)))
    return out


def _block_loss(block: nn.Module, inputs: list, targets: list, context, data: list, idx: int) -> torch.Tensor:
    args, kwargs = inputs[idx]
    if context is not None:
        context.t = data[idx][1]
    out = _first_tensor(block(*args, **kwargs))
    return (out - targets[idx]).pow(2).sum(1).mean()  # BRECQ's loss: squared error summed over channels


def _eval_losses(block, inputs, targets, context, data) -> list[float]:
    with torch.no_grad():
        return [float(_block_loss(block, inputs, targets, context, data, i)) for i in range(len(data))]


def reconstruct(quantized: Denoiser, reference: Denoiser, layers: list[str], data: list[tuple],
                config: ReconstructConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Learn the rounding of ``layers`` (quantized modules of ``quantized``, in execution order) block by
    block against ``reference`` (the same model in full precision) on calibration batches ``data``
    (see :func:`calibration_batches`). Returns one record per block."""
    start = time.monotonic()
    units = find_blocks(layers, quantized, config.granularity)
    gen = torch.Generator().manual_seed(config.seed)
    context = quantized.runtime
    records: list[dict[str, Any]] = []
    frozen = [p for p in quantized.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with eval_mode(quantized), eval_mode(reference), tqdm(units, desc="reconstructing blocks",
                                                            disable=not progress, leave=False) as bar:
            for i, (block_name, names) in enumerate(bar):
                left = None if config.time_budget is None else config.time_budget - (time.monotonic() - start)
                record = {"block": block_name, "layers": len(names)}
                if left is not None and left <= 0:
                    records.append({**record, "result": "nearest (time budget spent)"})
                    continue
                records.append(_reconstruct_block(quantized, reference, block_name, names, data, context, config,
                                                  None if left is None else left / (len(units) - i), gen, record))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    # the time budget makes the result depend on the clock: under torchrun every rank keeps rank 0's roundings
    distributed.share_state(quantized)
    return distributed.broadcast(records)


def _reconstruct_block(quantized, reference, block_name, names, data, context, config, seconds, gen, record):
    t0 = time.monotonic()
    inputs = _capture(quantized, block_name, data, "inputs")
    targets = _capture(reference, block_name, data, "output")
    block = quantized.get_submodule(block_name)
    modules = [quantized.get_submodule(n) for n in names]
    base = _eval_losses(block, inputs, targets, context, data)  # round-to-nearest, per batch
    # each calibration batch (one timestep) counts relative to its round-to-nearest error (scaled so the
    # mean weight is 1, which keeps the regulariser's balance): without this the low-noise steps, whose
    # errors are largest, dominate and the high-noise steps get worse
    mean_base = sum(base) / len(base)
    weights = [mean_base / max(b, 1e-12) for b in base]
    nearest = [{n: b.clone() for n, b in m.named_buffers() if n.startswith("weight_q")} for m in modules]
    done = False
    try:
        roundings = [ar for m, n in zip(modules, names) for ar in _attach(m, reference.get_submodule(n))]
        it = _train(block, roundings, inputs, targets, context, data, weights, config, seconds, gen, t0)
        for m in modules:
            _detach(m, keep=True)
        after = _eval_losses(block, inputs, targets, context, data)
        # accept on the objective that was optimised: the timestep-weighted error
        score = sum(w * a for w, a in zip(weights, after)) / len(after)
        done = it > 0 and score <= mean_base
    finally:
        for m, ints in zip(modules, nearest):
            if m.rounding is not None:
                _detach(m, keep=False)  # interrupted: drop the learning state
            if not done:  # never worse than round-to-nearest on the calibration data
                for name, value in ints.items():
                    getattr(m, name).copy_(value)
    result = "adaround" if done else ("nearest (time budget spent)" if it == 0 else
                                      "nearest (learned rounding was not better)")
    return {**record, "result": result, "iters": it, "seconds": round(time.monotonic() - t0, 2),
            "loss_nearest": mean_base, "loss_learned": score, "loss": "timestep-weighted block output MSE"}


def _train(block, roundings, inputs, targets, context, data, weights, config, seconds, gen, t0) -> int:
    """Adam on the rounding variables until ``config.iters`` steps or ``seconds``; returns the steps taken."""
    opt = torch.optim.Adam([ar.v for ar in roundings], lr=config.lr)
    b_start, b_end = config.beta
    it = 0
    with context.using(mode="straight_through"):
        while it < config.iters:
            elapsed = time.monotonic() - t0
            if seconds is not None and elapsed >= seconds:
                break
            frac = max(it / config.iters, 0.0 if seconds is None else elapsed / seconds)
            i = int(torch.randint(len(data), (1,), generator=gen))
            loss = _block_loss(block, inputs, targets, context, data, i) * weights[i]
            if frac >= config.warmup:
                beta = b_end + (b_start - b_end) * (1 - (frac - config.warmup) / (1 - config.warmup))
                loss = loss + config.round_weight * sum(ar.regularizer(beta) for ar in roundings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
    return it


def correct_bias(quantized: Denoiser, reference: Denoiser, layers: list[str], data: list[tuple],
                 progress: bool = True) -> int:
    """Empirical bias correction (Nagel et al., 2019): move the mean output error of each quantized layer
    (per output channel, over the calibration batches) into its bias. Rounding errors that survive as a
    mean shift add up over the sampling steps, so removing them matters more for final samples than for
    a single step. Layers without a bias are left alone. Returns the number of corrected layers.

    Layers are corrected one at a time in execution order, each measured with inputs from the quantized
    model after the layers above it were corrected, so upstream errors are corrected too (correcting all
    at once overshoots: a shift fixed upstream is fixed again below). The full-precision means are
    measured in one pass.
    """
    targets = [name for name in layers if getattr(quantized.get_submodule(name), "bias", None) is not None]
    want = _channel_means(reference, targets, data)
    for name in tqdm([n for n in targets if n in want], desc="bias correction", disable=not progress, leave=False):
        got = _channel_means(quantized, [name], data, stop=True)
        quantized.get_submodule(name).bias.data -= (got[name] - want[name]).float()
    return len(want)


def _channel_means(model: Denoiser, names: list[str], data: list[tuple], stop: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of each named layer's output over ``data`` (channels: dim 1 of a conv's
    output, the last dim of a linear's). ``stop``: end each forward pass at the (single) named layer."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(module, args, out):
            dim = 1 if isinstance(module, (nn.Conv2d, QuantConv2d)) else out.dim() - 1
            flat = out.detach().double().movedim(dim, -1).reshape(-1, out.shape[dim])
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + len(flat)
            if stop:
                raise _Stop
        return fn

    with eval_mode(model), hooks([(model.get_submodule(n), "post", hook(n)) for n in names]):
        _run_until_stop(model, data)
    return {n: sums[n] / counts[n] for n in names if n in sums}
