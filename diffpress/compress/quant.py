"""Shared quantization primitives: weight quantizers, activation range rules, and fake-quant modules.

Everything here is simulated in PyTorch (fake quantization: values are rounded to the integer grid and
mapped back to float); the exported ONNX graph carries the same scales as real QuantizeLinear /
DequantizeLinear nodes. Scales live in buffers so ``torch.export`` captures them as constants.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffpress.calibration.observers import StepStats
from diffpress.errors import DiffpressError

RANGE_RULES = ("max", "percentile", "mse")


# --------------------------------------------------------------------------------------------- weights
def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed quantization of a weight, per output channel or per group of input channels.

    Returns ``(q, scale)``: ``q`` int8 holding values in ``[-(2^(b-1)-1), 2^(b-1)-1]``, ``scale`` of shape
    ``(out, 1, ...)`` per channel or ``(out, in/group_size, 1, ...)`` per group (groups run along the
    flattened input dimension).

    >>> q, s = quantize_weight(torch.tensor([[1.0, -0.5], [0.25, 0.1]]), bits=8)
    >>> q.tolist(), [round(v, 6) for v in s.flatten().tolist()]
    ([[127, -64], [127, 51]], [0.007874, 0.001969])
    """
    qmax = 2 ** (bits - 1) - 1
    out = w.shape[0]
    flat = w.detach().reshape(out, -1).float()
    if group_size is None:
        amax = flat.abs().amax(1, keepdim=True)
    else:
        if flat.shape[1] % group_size:
            raise DiffpressError(f"group_size {group_size} does not divide the input size {flat.shape[1]}")
        amax = flat.view(out, -1, group_size).abs().amax(2)
    scale = (amax.clamp(min=1e-12) / qmax)
    expanded = scale if group_size is None else scale.repeat_interleave(group_size, 1)
    q = torch.clamp(torch.round(flat / expanded), -qmax, qmax).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Inverse of :func:`quantize_weight` (float32)."""
    out = q.shape[0]
    flat = q.reshape(out, -1).float()
    expanded = scale if group_size is None else scale.repeat_interleave(group_size, 1)
    return (flat * expanded).reshape(q.shape)


# ----------------------------------------------------------------------------------------- activations
def act_qparams(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero_point) for a range: unsigned asymmetric ``[0, 2^b-1]`` (what ONNX Runtime's x86 int8
    kernels want) or signed symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0 (TensorRT).

    >>> act_qparams(-1.0, 3.0)
    (0.01568627450980392, 64)
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range must hold 0 exactly (padding, ReLU zeros)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return max(max(-lo, hi), 1e-8) / qmax, 0
    qmax = 2 ** bits - 1
    scale = max(hi - lo, 1e-8) / qmax
    return scale, int(min(max(round(-lo / scale), 0), qmax))


def fake_quant_values(x: torch.Tensor, scale: float, zp: int, bits: int, symmetric: bool) -> torch.Tensor:
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
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
    [[100.0, 300.0, 500.0], [700.0, 900.0]]
    """
    ts = sorted(timesteps)
    k = max(1, min(k, len(ts)))
    bounds = [round(i * len(ts) / k) for i in range(k + 1)]
    return [ts[bounds[i]:bounds[i + 1]] for i in range(k)]


class TimestepContext:
    """Carries the current timestep from the Denoiser's forward to the activation quantizers inside it."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None


class ActQuant(nn.Module):
    """Static per-tensor activation fake-quantizer with ``K`` timestep groups.

    ``scale``/``zero_point`` hold one entry per group; ``bounds`` (K-1, ascending) split the timestep
    axis: group ``i`` serves ``bounds[i-1] <= t < bounds[i]``. With K = 1 it is a plain static quantizer.
    """

    def __init__(self, scales: list[float], zero_points: list[int], bounds: list[float], bits: int = 8,
                 symmetric: bool = False, context: TimestepContext | None = None):
        super().__init__()
        self.bits, self.symmetric, self.context = bits, symmetric, context
        self.qmin, self.qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_points, dtype=torch.int32))
        self.register_buffer("bounds", torch.tensor(bounds, dtype=torch.float32))

    @property
    def groups(self) -> int:
        return len(self.scale)

    def group_index(self) -> torch.Tensor:
        if self.groups == 1:
            return torch.zeros((), dtype=torch.long)
        if self.context is None or self.context.t is None:
            raise DiffpressError("this quantizer has timestep groups but no timestep; call it through the Denoiser")
        t = self.context.t.reshape(-1)[:1].float()  # a batch shares one timestep in every sampler
        return (t >= self.bounds).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.group_index()
        scale = self.scale[idx].reshape(())
        zp = self.zero_point[idx].reshape(())
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = "int8 symmetric" if self.symmetric else f"uint{self.bits}"
        return f"{kind}, groups={self.groups}"


class QuantLinear(nn.Module):
    """Linear with quantized weight (int8 storage, per-channel or per-group scales) and fake-quantized input."""

    def __init__(self, layer: nn.Linear, bits: int, group_size: int | None, act: ActQuant | None):
        super().__init__()
        q, scale = quantize_weight(layer.weight, bits, group_size)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.act = act

    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per-channel"
        return f"{self.in_features} -> {self.out_features}, W{self.bits} {g}"


class QuantConv2d(nn.Module):
    """Conv2d with quantized weight and fake-quantized input; with ``split`` the input is a skip-concat and
    the convolution runs as two partial convolutions, each part with its own activation quantizer
    (exactly equal to the single convolution in float; deployable as two integer convs and an add)."""

    def __init__(self, layer: nn.Conv2d, bits: int, group_size: int | None, acts: list[ActQuant] | None,
                 split: int | None = None):
        super().__init__()
        if layer.groups != 1 and split is not None:
            raise DiffpressError("split quantization needs a dense convolution (groups=1)")
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        if isinstance(self.padding, str) or layer.padding_mode != "zeros":
            raise DiffpressError(f"{layer} uses padding mode {layer.padding_mode!r}/{layer.padding!r}; "
                                 "diffpress quantizes zero-padded convolutions only")
        self.bits, self.group_size, self.split = bits, group_size, split
        parts = [layer.weight] if split is None else [layer.weight[:, :split], layer.weight[:, split:]]
        for i, w in enumerate(parts):
            q, scale = quantize_weight(w, bits, group_size)
            self.register_buffer(f"weight_q{i}", q)
            self.register_buffer(f"weight_scale{i}", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.acts = nn.ModuleList(acts or [])
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = layer.kernel_size

    def weight(self, part: int = 0) -> torch.Tensor:
        return dequantize_weight(getattr(self, f"weight_q{part}"), getattr(self, f"weight_scale{part}"), self.group_size)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            if len(self.acts):
                x = self.acts[0](x)
            return self._conv(x, self.weight(0), self.bias)
        a, b = x[:, : self.split], x[:, self.split:]
        if len(self.acts):
            a, b = self.acts[0](a), self.acts[1](b)
        return self._conv(a, self.weight(0), self.bias) + self._conv(b, self.weight(1), None)

    def extra_repr(self) -> str:
        g = f"group {self.group_size}" if self.group_size else "per-channel"
        s = f", split at {self.split}" if self.split is not None else ""
        return f"{self.in_channels} -> {self.out_channels}, k={self.kernel_size}, W{self.bits} {g}{s}"
