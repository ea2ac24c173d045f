"""Shared quantization primitives: weight quantizers, activation range rules, and fake-quant modules.

Everything here is simulated in PyTorch (fake quantization: values are rounded to the integer grid and
mapped back to float); the exported ONNX graph carries the same scales as real QuantizeLinear /
DequantizeLinear nodes. Scales live in buffers so ``torch.export`` captures them as constants.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from diffpress.calibration.observers import StepStats
from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext

RANGE_RULES = ("max", "percentile", "mse")
QD = torch.ops.quantized_decomposed


# --------------------------------------------------------------------------------------------- weights
def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed quantization of a weight, per output channel or per group of input elements.

    Returns ``(q, scale)``: ``q`` int8 with the weight's shape holding values in
    ``[-(2^(b-1)-1), 2^(b-1)-1]``; ``scale`` of shape ``(out,)`` per channel or ``(out, fan_in/group_size)``
    per group (groups run along the flattened input dimension).

    >>> q, s = quantize_weight(torch.tensor([[1.0, -0.5], [0.25, 0.1]]), bits=8)
    >>> q.tolist(), [round(v, 6) for v in s.tolist()]
    ([[127, -64], [127, 51]], [0.007874, 0.001969])
    """
    qmax = 2 ** (bits - 1) - 1
    out = w.shape[0]
    flat = w.detach().reshape(out, -1).float()
    if group_size is None:
        scale = flat.abs().amax(1).clamp(min=1e-12) / qmax
        expanded = scale[:, None]
    else:
        if flat.shape[1] % group_size:
            raise DiffpressError(f"group_size {group_size} does not divide the input size {flat.shape[1]}")
        scale = flat.view(out, -1, group_size).abs().amax(2).clamp(min=1e-12) / qmax
        expanded = scale.repeat_interleave(group_size, 1)
    q = torch.clamp(torch.round(flat / expanded), -qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int | None, bits: int = 8,
                      plain: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` as a registered ``quantized_decomposed`` op, so the exported
    graph gets a DequantizeLinear on an integer initializer (per-axis, or blocked for groups); ``plain``
    computes the same values with ordinary arithmetic."""
    qmax = 2 ** (bits - 1) - 1
    if plain:
        flat = q.reshape(q.shape[0], -1).float()
        expanded = scale[:, None] if group_size is None else scale.repeat_interleave(group_size, 1)
        return (flat * expanded).reshape(q.shape)
    if group_size is None:
        return QD.dequantize_per_channel(q, scale, None, 0, -qmax, qmax, torch.int8)
    flat = q.reshape(q.shape[0], -1)
    w = QD.dequantize_per_channel_group(flat, scale, None, -qmax - 1, qmax, torch.int8, group_size, torch.float32)
    return w.reshape(q.shape)


# ----------------------------------------------------------------------------------------- activations
def act_qparams(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero_point) for a range: unsigned asymmetric ``[0, 2^b-1]`` (what ONNX Runtime's x86 int8
    kernels want) or signed symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0 (TensorRT).

    >>> act_qparams(-1.0, 3.0)
    (0.01568627450980392, 64)
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range must hold 0 exactly (padding, ReLU zeros)
    if symmetric:
        return max(max(-lo, hi), 1e-8) / (2 ** (bits - 1) - 1), 0
    qmax = 2 ** bits - 1
    scale = max(hi - lo, 1e-8) / qmax
    return scale, int(min(max(round(-lo / scale), 0), qmax))


def fake_quant_values(x: torch.Tensor, scale: float, zp: int, bits: int, symmetric: bool) -> torch.Tensor:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def aggregate_range(steps: list[StepStats], rule: str, bits: int = 8, symmetric: bool = False,
                    percentile: float = 99.99) -> tuple[float, float]:
    """One activation range from per-timestep statistics, by a named rule.

    - ``max``: the widest range seen at any step;
    - ``percentile``: per step the ``percentile`` / ``100 - percentile`` quantiles of the sampled values,
      then the widest over steps (clips rare outliers, keeps every step's typical range);
    - ``mse``: the clipping of the widest range that minimises the quantization MSE over the pooled
      samples of all steps (grid over 60 shrink factors).
    """
    if rule not in RANGE_RULES:
        raise DiffpressError(f"unknown activation range rule {rule!r}; allowed: {', '.join(RANGE_RULES)}")
    lo, hi = min(s.min for s in steps), max(s.max for s in steps)
    if rule == "max":
        return lo, hi
    if rule == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=torch.float64)
        ranges = [torch.quantile(s.samples.double(), q).tolist() for s in steps if len(s.samples)]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)
    pooled = torch.cat([s.samples for s in steps]).float()
    best, best_err = (lo, hi), math.inf
    for k in torch.linspace(1.0, 0.2, 60).tolist():
        scale, zp = act_qparams(lo * k, hi * k, bits, symmetric)
        err = float((fake_quant_values(pooled, scale, zp, bits, symmetric) - pooled).pow(2).mean())
        if err < best_err:
            best, best_err = (lo * k, hi * k), err
    return best


def timestep_groups(timesteps: list[float], k: int) -> list[list[float]]:
    """Split timesteps into ``k`` contiguous groups of (nearly) equal size, ascending.

    >>> timestep_groups([900.0, 700.0, 500.0, 300.0, 100.0], 2)
    [[100.0, 300.0], [500.0, 700.0, 900.0]]
    """
    ts = sorted(timesteps)
    k = max(1, min(k, len(ts)))
    bounds = [round(i * len(ts) / k) for i in range(k + 1)]
    return [ts[bounds[i]:bounds[i + 1]] for i in range(k)]


class ActQuant(nn.Module):
    """Static per-tensor activation fake-quantizer with ``K`` timestep groups.

    ``scale``/``zero_point`` hold one entry per group; ``bounds`` (K-1, ascending) split the timestep
    axis: group ``i`` serves ``bounds[i-1] <= t < bounds[i]``. With K = 1 it is a plain static quantizer.
    The group is picked in the graph (compare, sum, gather), so one exported ONNX graph carries all K
    scale sets and ONNX Runtime still fuses the integer kernels. ``context`` is the denoiser's
    :class:`~diffpress.runtime.RunContext`: the timestep and the arithmetic mode come from it.
    """

    def __init__(self, scales: list[float], zero_points: list[int], bounds: list[float], bits: int = 8,
                 symmetric: bool = False, context: RunContext | None = None):
        super().__init__()
        self.bits, self.symmetric, self.context = bits, symmetric, context
        if symmetric:  # ONNX QuantizeLinear saturates to the full int8 range
            self.qmin, self.qmax, self.dtype = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8
        else:
            self.qmin, self.qmax, self.dtype = 0, 2 ** bits - 1, torch.uint8
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_points, dtype=torch.int32))
        self.register_buffer("bounds", torch.tensor(bounds, dtype=torch.float32))
        self.literals: tuple[list[float], list[int]] | None = None  # set only inside literal_scales()

    @property
    def groups(self) -> int:
        return len(self.scale)

    def group_index(self) -> torch.Tensor:
        if self.groups == 1:
            return torch.zeros(1, dtype=torch.long, device=self.scale.device)
        if self.context is not None and self.context.group is not None:  # fixed for an export
            return torch.tensor([self._fixed_group()], device=self.scale.device)
        if self.context is None or self.context.t is None:
            raise DiffpressError("this quantizer has timestep groups but no timestep; call it through the Denoiser")
        t = self.context.t.reshape(-1)[:1].float()  # a batch shares one timestep in every sampler
        return (t[:, None] >= self.bounds).sum(1)

    def _fixed_group(self) -> int:
        g = 0 if self.groups == 1 else self.context.group
        if g is None or not 0 <= g < self.groups:
            raise DiffpressError(f"literal scales need a timestep group in 0..{self.groups - 1} (run context "
                                 f"group={g}); set it with runtime.using(group=...)")
        return g

    def _literal(self, x: torch.Tensor) -> torch.Tensor:
        """Fake quantization with Python-number scale and zero point (see :func:`literal_scales`); 8-bit values
        are stored as int8 (uint8 shifted by 128: the same numbers)."""
        if self.literals is None:
            raise DiffpressError("mode 'literal' needs the scales as numbers: run inside quant.literal_scales(model)")
        g = self._fixed_group()
        scale, zp = self.literals[0][g], self.literals[1][g]
        if self.bits != 8:
            return fake_quant_values(x, scale, zp, self.bits, self.symmetric)
        shift = 0 if self.symmetric else 128
        q = QD.quantize_per_tensor(x, scale, zp - shift, -128, 127, torch.int8)
        return QD.dequantize_per_tensor(q, scale, zp - shift, -128, 127, torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _mode(self.context) == "literal":
            return self._literal(x)
        idx = self.group_index()  # (1,), index_select keeps export free of data-dependent sizes
        scale = self.scale.index_select(0, idx).reshape(())
        zp = self.zero_point.index_select(0, idx).reshape(())
        mode = _mode(self.context)
        if mode == "straight_through":  # forward: the fake-quantized value; backward: identity inside the range
            zpf = zp.float()
            inside = torch.clamp(x, (self.qmin - zpf) * scale, (self.qmax - zpf) * scale)
            return inside + (fake_quant_values(x.detach(), scale, zpf, self.bits, self.symmetric) - inside).detach()
        if mode == "plain":
            return fake_quant_values(x, scale, zp.float(), self.bits, self.symmetric)
        q = QD.quantize_per_tensor.tensor(x, scale, zp, self.qmin, self.qmax, self.dtype)
        return QD.dequantize_per_tensor.tensor(q, scale, zp, self.qmin, self.qmax, self.dtype)

    def extra_repr(self) -> str:
        kind = f"int{self.bits} symmetric" if self.symmetric else f"uint{self.bits}"
        return f"{kind}, groups={self.groups}"


class DynamicActQuant(nn.Module):
    """Dynamic per-token activation fake-quantizer (SVDQuant's 4-bit activations): every token (a row of a
    linear's input, a pixel of a convolution's) is split into groups of ``group_size`` channels, and each
    group gets its own asymmetric range from its own min and max at run time. The zero point shifts each
    group by its lower bound, so non-negative groups (post-ReLU) and groups bounded below (post-GELU / SiLU)
    use all ``2^bits`` levels. Nothing is calibrated. In ONNX it exports as float arithmetic (ReduceMin /
    ReduceMax, Div, Round, Clip, Mul): standard ops that carry the numbers; no CPU kernel runs them in integer.

    >>> q = DynamicActQuant(bits=4, group_size=2, channel_dim=-1)
    >>> q(torch.tensor([[0.0, 1.5, -1.0, 2.0, 0.0, 0.11]])).tolist()  # groups (0, 1.5), (-1, 2), (0, 0.11)
    [[0.0, 1.5, -1.0, 2.0, 0.0, 0.10999999940395355]]
    """

    def __init__(self, bits: int, group_size: int, channel_dim: int, context: RunContext | None = None):
        super().__init__()
        self.bits, self.group_size, self.channel_dim, self.context = bits, group_size, channel_dim, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(self.channel_dim, -1)
        c = moved.shape[-1]
        g = moved.reshape(*moved.shape[:-1], c // self.group_size, self.group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        qmax = 2 ** self.bits - 1
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zp = torch.round(-lo / scale)
        y = (torch.clamp(torch.round(g / scale) + zp, 0, qmax) - zp) * scale
        if _mode(self.context) == "straight_through":
            y = g + (y - g).detach()
        return y.reshape(moved.shape).movedim(-1, self.channel_dim)

    def extra_repr(self) -> str:
        return f"dynamic uint{self.bits} per token, groups of {self.group_size}"


def act_group(channels: int, group_size: int) -> int:
    """The group size a dynamic quantizer uses on ``channels``: ``group_size`` or, when it does not divide
    them, the largest divisor of ``channels`` below it.

    >>> act_group(128, 64), act_group(96, 64), act_group(40, 64)
    (64, 48, 40)
    """
    return max(d for d in range(1, min(group_size, channels) + 1) if channels % d == 0)


def _maybe(quantizer: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


def _mode(context: RunContext | None) -> str:
    return "evaluate" if context is None else context.mode


class _QuantWeights:
    """What the quantized layers share: the arithmetic mode from the run-time context, and their integer
    buffers declared for packed storage (two int4 values per byte on disk; see ``Denoiser.save_pretrained``)."""

    bits: int
    context: RunContext | None

    def _dequantized(self, part: str) -> torch.Tensor:
        q, scale = getattr(self, f"weight_q{part}"), getattr(self, f"weight_scale{part}")
        mode = _mode(self.context)
        if mode == "literal" and self.bits in (7, 8) and self.group_size is None:
            # per-channel int8 storage (7-bit values too) with an explicit int64 zero point: the weight pattern
            # XNNPACK lowers
            return QD.dequantize_per_channel(q, scale, getattr(self, f"weight_zero{part}"), 0, -127, 127, torch.int8)
        return dequantize_weight(q, scale, self.group_size, self.bits, plain=mode in ("plain", "literal"))

    def packed_buffers(self) -> dict[str, int]:
        """Integer buffers (name -> bits) that hold ``bits``-bit values in int8 storage."""
        if self.bits != 4:
            return {}
        return {n: self.bits for n, _ in self.named_buffers(recurse=False) if n.startswith("weight_q")}


class QuantLinear(_QuantWeights, nn.Module):
    """Linear with a quantized weight (int8 storage, per-channel or per-group scales), a fake-quantized input
    and optionally a fake-quantized output. The bias is added after the output quantizer: that is the
    pattern ONNX Runtime fuses into QLinearMatMul (and it is exact: the bias stays in float)."""

    def __init__(self, layer: nn.Linear, bits: int, group_size: int | None,
                 act_in: ActQuant | None = None, act_out: ActQuant | None = None, context: RunContext | None = None):
        super().__init__()
        self.context = context
        q, scale = quantize_weight(layer.weight, bits, group_size)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.act_in, self.act_out = act_in, act_out
        self.rounding: nn.ModuleList | None = None  # set only while reconstruction learns the rounding

    def weight(self) -> torch.Tensor:
        if self.rounding is not None:
            return self.rounding[0]()
        return self._dequantized("")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = _maybe(self.act_in, x), self.weight()
        # mode literal: F.linear, what XNNPACK recognises as a (quantized) linear
        y = _maybe(self.act_out, F.linear(x, w) if _mode(self.context) == "literal" else torch.matmul(x, w.t()))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per-channel"
        return f"{self.in_features} -> {self.out_features}, W{self.bits} {g}"


def conv_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The explicit zero padding of ``layer`` (``padding="same"`` / ``"valid"`` resolved), or None when it is
    not zero padding or ``same`` pads one side more than the other (even kernels).

    >>> conv_padding(nn.Conv2d(2, 2, 3, padding="same")), conv_padding(nn.Conv2d(2, 2, 4, padding="same"))
    ((1, 1), None)
    """
    if layer.padding_mode != "zeros":
        return None
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(layer.padding)


class QuantConv2d(_QuantWeights, nn.Module):
    """Conv2d with a quantized weight and fake-quantized input (and output, bias added after it).

    With ``split`` the input is a skip-concat and the convolution runs as two partial convolutions, each
    part with its own quantizers: exactly the single convolution in float, and deployable as two integer
    convolutions and an add (Q-Diffusion's split quantization, made runnable)."""

    def __init__(self, layer: nn.Conv2d, bits: int, group_size: int | None, acts_in: list[ActQuant] | None = None,
                 acts_out: list[ActQuant] | None = None, split: int | None = None, context: RunContext | None = None):
        super().__init__()
        self.context = context
        if layer.groups != 1 and split is not None:
            raise DiffpressError("split quantization needs a dense convolution (groups=1)")
        padding = conv_padding(layer)
        if padding is None:
            raise DiffpressError(f"{layer} uses padding {layer.padding!r} / padding_mode {layer.padding_mode!r}; "
                                 "diffpress quantizes convolutions with zero padding, the same on both sides")
        self.stride, self.padding, self.dilation, self.groups = layer.stride, padding, layer.dilation, layer.groups
        self.bits, self.group_size, self.split = bits, group_size, split
        parts = [layer.weight] if split is None else [layer.weight[:, :split], layer.weight[:, split:]]
        for i, w in enumerate(parts):
            q, scale = quantize_weight(w, bits, group_size)
            self.register_buffer(f"weight_q{i}", q)
            self.register_buffer(f"weight_scale{i}", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.acts_in = nn.ModuleList(acts_in or [])
        self.acts_out = nn.ModuleList(acts_out or [])
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = layer.kernel_size
        self.rounding: nn.ModuleList | None = None  # set only while reconstruction learns the rounding

    @property
    def parts(self) -> int:
        return 1 if self.split is None else 2

    def weight(self, part: int = 0) -> torch.Tensor:
        if self.rounding is not None:
            return self.rounding[part]()
        return self._dequantized(str(part))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x] if self.split is None else [x[:, : self.split], x[:, self.split:]]
        y = None
        for i, xi in enumerate(xs):
            if len(self.acts_in):
                xi = self.acts_in[i](xi)
            yi = F.conv2d(xi, self.weight(i), None, self.stride, self.padding, self.dilation, self.groups)
            if len(self.acts_out):
                yi = self.acts_out[i](yi)
            y = yi if y is None else y + yi
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per-channel"
        s = f", split at {self.split}" if self.split is not None else ""
        return f"{self.in_channels} -> {self.out_channels}, k={self.kernel_size}, W{self.bits} {g}{s}"


@contextlib.contextmanager
def literal_scales(module: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the quantizers under ``module`` hold their scales as Python numbers and the weight
    quantizers an explicit zero point, which run-time mode ``literal`` uses: the graph ``torch.export`` then
    captures has constant activation scales (a backend reads them as static quantization) and the exact
    numbers of the PyTorch model.

    >>> q, x = ActQuant([0.1], [128], [], context=RunContext()), torch.tensor([0.26, -20.0])
    >>> with literal_scales(q), q.context.using(mode="literal"):
    ...     y = q(x)
    >>> [round(v, 4) for v in y.tolist()], torch.equal(y, q(x))
    ([0.3, -12.8], True)
    """
    acts = [m for m in module.modules() if isinstance(m, ActQuant)]
    layers = [m for m in module.modules() if isinstance(m, _QuantWeights)]
    try:
        for m in acts:
            m.literals = ([float(v) for v in m.scale.tolist()], [int(v) for v in m.zero_point.tolist()])
        for m in layers:
            for name, scale in list(m.named_buffers(recurse=False)):
                if name.startswith("weight_scale") and scale.dim() == 1:
                    m.register_buffer(name.replace("scale", "zero"), torch.zeros(len(scale), dtype=torch.long),
                                      persistent=False)
        yield module
    finally:
        for m in acts:
            m.literals = None
        for m in layers:
            for name in [n for n, _ in m.named_buffers(recurse=False) if n.startswith("weight_zero")]:
                delattr(m, name)
