"""Low-rank outlier absorption (SmoothQuant + SVDQuant): ``lowrank_(denoiser, config, calibration)``.

Runs before :mod:`~diffpress.compress.quantize` and hands it layers whose weights and inputs quantize well
at 4 bits. Per layer (layers that read the same tensor, e.g. attention's q / k / v, form one group):

1. **Smoothing.** Activation outliers migrate into the weights: per input channel
   ``s = max|X|^a / max|W|^(1-a)``, ``X' = X / s``, ``W' = W * s`` (exact in float). ``max|X|`` comes from the
   whole calibration trajectory (``act_stat``: the mean of the per-step maxima, or the largest value any step
   saw); ``a`` is searched per group on the group's output error with its weights and activations
   quantized as the following quantize pass will (``alpha_grid``; "no smoothing" is a candidate too). The
   factor is folded into the preceding LayerNorm / GroupNorm where that is exact (found on the graph and
   checked on a calibration batch), otherwise kept as a per-channel ``Mul`` in front of the layer.
2. **Low-rank branch.** ``W' = L1 @ L2 + R`` with rank ``r`` (SVD in float64); then SVDQuant's refinement
   ``L <- SVD_r(W' - Q(W' - L))``, scored on the layer's output error with quantized activations, keeping the
   best and stopping at the first step that does not improve it. The branch stays in float (fp32, or fp16
   storage); only the residual ``R`` is quantized afterwards. A k x k convolution's branch is a k x k
   convolution to ``r`` channels followed by a 1 x 1 convolution (exact in float).

``rank: 0`` is SmoothQuant alone. A LoRA (``A``, ``B`` per layer) applied afterwards joins the branch
(:func:`diffpress.compress.lora.apply_lora`): the quantized residual is not touched.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from diffpress.calibration.dataset import CalibrationSet
from diffpress.compress.quant import (
    DynamicActQuant,
    act_group,
    act_qparams,
    conv_padding,
    dequantize_weight,
    fake_quant_values,
    quantize_weight,
)
from diffpress.compress.registry import PassSpec, register
from diffpress.compress.select import check_roles, matches, select_layers, set_submodule
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError, check_allowed
from diffpress.graph import capture
from diffpress.runtime import hooks

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
# ops a channel passes through unchanged on its way from a norm to a layer (layout only)
_LAYOUT = {"view", "reshape", "_unsafe_view", "permute", "transpose", "flatten", "contiguous", "clone", "unflatten"}
_NORMS = {"layer_norm", "group_norm", "native_layer_norm", "native_group_norm"}


@dataclass
class LowRankConfig:
    """Smoothing and low-rank branch settings, and the quantizers the search simulates (set them as in the
    quantize pass that follows; a recipe checks they agree).

    >>> LowRankConfig(rank=16).rank
    16
    >>> LowRankConfig(act_stat="median")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: act_stat: 'median' is not allowed; allowed: max, mean
    """

    rank: int = 32  # 0: smoothing only (SmoothQuant)
    ranks: dict[str, int] = field(default_factory=dict)  # glob over module names -> rank, first match wins
    # cap: the branch costs at most this fraction of its layer's MACs (small layers get a smaller rank); null: no cap
    max_fraction: float | None = 0.25
    smooth: bool = True
    alpha: float | None = None  # null: searched per layer group over alpha_grid
    alpha_grid: list[float] = field(default_factory=lambda: list(ALPHAS))
    # per-channel max|X| over the trajectory: "mean" of the per-step maxima (measured 0.5-0.6 dB better at W4A4 on
    # both zoo models, see README) or "max" over every step
    act_stat: str = "mean"
    refine_iters: int = 100  # SVDQuant's refinement, stopped at the first non-improvement; 0: plain SVD
    svd: str = "full"  # "randomized": torch.svd_lowrank, for SD-sized layers where the full SVD is slow
    branch_dtype: str = "float32"  # "float16": the branch is stored in fp16 and computed in fp32
    fold: bool = True  # fold the smoothing factor into a preceding norm where exact
    # the quantizers the search and the refinement simulate
    weights: str = "int4"
    group_size: int | None = 64  # per group where it divides the layer's input, else per output channel
    activations: str | None = "int4"
    act_mode: str = "dynamic"
    act_group_size: int = 64
    skip_roles: list[str] = field(default_factory=lambda: ["time_embedding", "first", "last"])
    skip: list[str] = field(default_factory=list)
    tokens: int = 2048  # input rows (linear) kept per layer group to score candidates
    maps: int = 32  # input maps (convolution) kept per layer group
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        check_allowed("act_stat", self.act_stat, ("max", "mean"))
        check_allowed("svd", self.svd, ("full", "randomized"))
        check_allowed("branch_dtype", self.branch_dtype, ("float32", "float16"))
        check_allowed("weights", self.weights, ("int8", "int4"))
        check_allowed("activations", self.activations, ("int8", "int4", None))
        check_allowed("act_mode", self.act_mode, ("static", "dynamic"))
        check_roles("skip_roles", self.skip_roles)
        if self.rank < 0 or any(not isinstance(r, int) or r < 0 for r in self.ranks.values()):
            raise DiffpressError(f"rank / ranks: ranks are integers >= 0, got {self.rank} / {self.ranks}")
        if self.max_fraction is not None and not 0 < self.max_fraction <= 1:
            raise DiffpressError(f"max_fraction: must be in (0, 1] or null, got {self.max_fraction}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise DiffpressError(f"alpha: must be in [0, 1] or null (searched), got {self.alpha}")
        if not self.alpha_grid or any(not 0 <= a <= 1 for a in self.alpha_grid):
            raise DiffpressError(f"alpha_grid: values in [0, 1], got {self.alpha_grid}")
        if self.refine_iters < 0:
            raise DiffpressError(f"refine_iters: must be >= 0, got {self.refine_iters}")

    def rank_of(self, name: str) -> int:
        pattern = matches(name, self.ranks)
        return self.ranks[pattern] if pattern is not None else self.rank


# ------------------------------------------------------------------------------------------------- modules
class LowRankLayer(nn.Module):
    """``y = residual(x / s) + up(down(x / s))``: a Linear or Conv2d split into a residual layer (an ordinary
    ``nn.Linear`` / ``nn.Conv2d`` that the quantize pass then quantizes) and a float low-rank branch.

    ``inv_smooth`` holds ``1 / s`` per input channel; ``smooth_in_graph`` says whether this layer multiplies
    by it (False when the factor was folded into a preceding norm, or there is no smoothing: then the buffer
    is kept for LoRA merging only)."""

    def __init__(self, layer: nn.Module, rank: int, smooth_in_graph: bool, branch_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.kind = "linear" if isinstance(layer, nn.Linear) else "conv2d"
        self.residual = layer
        channels = layer.in_features if self.kind == "linear" else layer.in_channels
        self.register_buffer("inv_smooth", torch.ones(channels))
        self.smooth_in_graph = smooth_in_graph
        self.branch = LowRankBranch(layer, rank, branch_dtype) if rank else None

    @property
    def rank(self) -> int:
        return 0 if self.branch is None else self.branch.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_in_graph:
            x = x * (self.inv_smooth if self.kind == "linear" else self.inv_smooth.view(1, -1, 1, 1))
        y = self.residual(x)
        return y if self.branch is None else y + self.branch(x)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, smoothing {'in graph' if self.smooth_in_graph else 'folded or none'}"


class LowRankBranch(nn.Module):
    """The float branch ``up(down(x))``: linear ``(r, in)`` then ``(out, r)``; for a convolution, a k x k
    convolution to ``r`` channels (the layer's stride, padding and dilation) then a 1 x 1 one."""

    keep_float = "low-rank branch of the lowrank pass (kept in float)"

    def __init__(self, layer: nn.Module, rank: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        w = layer.weight
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, conv_padding(layer), layer.dilation
            self.down = nn.Parameter(torch.zeros(rank, *w.shape[1:], dtype=dtype))
            self.up = nn.Parameter(torch.zeros(w.shape[0], rank, 1, 1, dtype=dtype))
        else:
            self.down = nn.Parameter(torch.zeros(rank, w.shape[1], dtype=dtype))
            self.up = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=dtype))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def set(self, l1: torch.Tensor, l2: torch.Tensor) -> None:
        """Set ``up = l1`` (out x r) and ``down = l2`` (r x fan_in), reshaped to the layer's layout."""
        dtype = self.down.dtype
        self.down = nn.Parameter(l2.reshape(l2.shape[0], *self.down.shape[1:]).to(dtype).contiguous())
        self.up = nn.Parameter(l1.reshape(l1.shape[0], l1.shape[1], *self.up.shape[2:]).to(dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down.float(), self.up.float()
        if self.conv:
            return F.conv2d(F.conv2d(x, down, None, self.stride, self.padding, self.dilation), up)
        return F.linear(F.linear(x, down), up)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {self.down.dtype}"


# ----------------------------------------------------------------------------------------------- statistics
@dataclass
class _Inputs:
    """One layer group's input: per-timestep per-channel min / max, and a sample to score candidates on."""

    channel_dim: int
    mins: dict[float, torch.Tensor] = field(default_factory=dict)
    maxs: dict[float, torch.Tensor] = field(default_factory=dict)
    sample: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, t: float, keep: int, gen: torch.Generator) -> None:
        x = x.detach().float()
        moved = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim])
        lo, hi = moved.amin(0), moved.amax(0)
        self.mins[t] = torch.minimum(self.mins[t], lo) if t in self.mins else lo
        self.maxs[t] = torch.maximum(self.maxs[t], hi) if t in self.maxs else hi
        if self.channel_dim == -1:  # tokens
            self.sample.append(moved[torch.randperm(len(moved), generator=gen)[:keep]])
        else:  # whole maps: a convolution's output needs its neighbourhoods
            self.sample.append(x[torch.randperm(len(x), generator=gen)[:keep]])

    def absmax(self, rule: str) -> torch.Tensor:
        per_step = torch.stack([torch.maximum(self.mins[t].abs(), self.maxs[t].abs()) for t in self.mins])
        return per_step.amax(0) if rule == "max" else per_step.mean(0)

    def data(self, limit: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.cat(self.sample)
        return x[torch.randperm(len(x), generator=gen)[:limit]]


def _collect(denoiser: Denoiser, calibration: CalibrationSet, groups: list[list[tuple[str, nn.Module]]],
             config: LowRankConfig, progress: bool) -> list[_Inputs]:
    gen = torch.Generator().manual_seed(config.seed)
    calls = max(1, math.ceil(len(calibration) / config.batch_size))
    stores = [_Inputs(-1 if isinstance(g[0][1], nn.Linear) else 1) for g in groups]
    runtime = denoiser.runtime

    def hook(store: _Inputs):
        keep = math.ceil((config.tokens if store.channel_dim == -1 else config.maps) / calls)

        def fn(module, args):
            store.update(args[0], float(runtime.t.reshape(-1)[0]), keep, gen)
        return fn

    specs = [(g[0][1], "pre", hook(store)) for g, store in zip(groups, stores)]
    with hooks(specs), runtime.using(mode="calibrate"), eval_mode(denoiser), torch.no_grad(), \
            tqdm(total=len(calibration), desc="lowrank: observing inputs", disable=not progress, leave=False) as bar:
        for x, t, cond in calibration.batches(config.batch_size):
            denoiser(x, t, cond)
            bar.update(len(x))
    return stores


# ------------------------------------------------------------------------------------------------- the search
class _Scorer:
    """Output error of one layer for candidate (smoothing factor, low-rank factors), with its residual weight and
    its input quantized as configured: ``|y - y_float|^2 / |y_float|^2`` over the collected inputs."""

    def __init__(self, module: nn.Module, x: torch.Tensor, inputs: _Inputs, config: LowRankConfig):
        self.module, self.x, self.inputs, self.config = module, x, inputs, config
        self.conv = isinstance(module, nn.Conv2d)
        self.w = module.weight.detach().double()
        self.flat = self.w.reshape(self.w.shape[0], -1)
        self.ref = self._apply(x, module.weight.detach().float())
        self.norm = max(float(self.ref.pow(2).sum()), 1e-30)
        fan_in = self.flat.shape[1]
        self.group = config.group_size if config.group_size and fan_in % config.group_size == 0 else None
        self.bits = int(config.weights[3:])

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.conv:
            return F.conv2d(x, w, None, m.stride, conv_padding(m), m.dilation)
        return F.linear(x, w)

    def _shape(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(1, -1, 1, 1) if self.conv else s

    def quantize_input(self, xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.activations is None:
            return xs
        bits = int(c.activations[3:])
        if c.act_mode == "dynamic":
            return DynamicActQuant(bits, act_group(xs.shape[1 if self.conv else -1], c.act_group_size),
                                   1 if self.conv else -1)(xs)
        lo = min(float((self.inputs.mins[t] / s).min()) for t in self.inputs.mins)  # s > 0 keeps the order
        hi = max(float((self.inputs.maxs[t] / s).max()) for t in self.inputs.maxs)
        scale, zp = act_qparams(lo, hi, bits)
        return fake_quant_values(xs, scale, zp, bits, False)

    def residual_q(self, r: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(*quantize_weight(r.float(), self.bits, self.group), self.group, self.bits, plain=True)

    def error(self, s: torch.Tensor, l1: torch.Tensor | None, l2: torch.Tensor | None,
              xq: torch.Tensor | None = None) -> float:
        ws = self.flat * s.double().repeat_interleave(self.flat.shape[1] // len(s))
        low = None if l1 is None else l1 @ l2
        r = ws if low is None else ws - low
        xs = self.x / self._shape(s)
        if xq is None:
            xq = self.quantize_input(xs, s)
        y = self._apply(xq, self.residual_q(r).reshape(self.w.shape))
        if low is not None:
            y = y + self._apply(xs, low.float().reshape(self.w.shape))
        return float((y - self.ref).pow(2).sum()) / self.norm


def smoothing_factor(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """``s = max|X|^a / max|W|^(1-a)`` per input channel, clamped to [1e-4, 1e4]; 1 where a channel is all zero
    (or for ``alpha=None``: no smoothing).

    >>> smoothing_factor(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 1.0]), 0.5).tolist()
    [2.0, 0.5, 1.0]
    """
    if alpha is None:
        return torch.ones_like(x_absmax)
    s = x_absmax.double().pow(alpha) / w_absmax.double().pow(1 - alpha)
    s = s.clamp(1e-4, 1e4)
    s[(x_absmax <= 0) | (w_absmax <= 0)] = 1.0
    return s.float()


def svd_r(w: torch.Tensor, rank: int, method: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` with ``L1 @ L2`` the best rank-``rank`` approximation of ``w`` (float64 SVD). ``randomized``:
    Halko et al.'s randomized SVD (``torch.svd_lowrank``, rank + 10 columns, 4 power iterations), much faster on
    SD-sized layers; used where the matrix is at least twice that wide.

    >>> w = torch.randn(6, 5, dtype=torch.float64)
    >>> l1, l2 = svd_r(w, 5)
    >>> bool(torch.allclose(l1 @ l2, w))
    True
    """
    w = w.double()
    if method == "randomized" and 2 * (rank + 10) <= min(w.shape):
        with torch.random.fork_rng(devices=[]):  # its random test matrix: the same on every run and every rank
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(w, q=rank + 10, niter=4)
        return u[:, :rank] * s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def _rank(config: LowRankConfig, name: str, module: nn.Module) -> int:
    out, fan_in = module.weight.shape[0], module.weight[0].numel()
    rank = min(config.rank_of(name), out, fan_in)
    if config.max_fraction is not None and rank:
        rank = min(rank, max(1, int(config.max_fraction * out * fan_in / (out + fan_in))))
    return rank


def _group_error(scorers: list[_Scorer], ranks: list[int], s: torch.Tensor, method: str) -> float:
    """The summed output error of a layer group for smoothing factor ``s``, with a plain rank-r SVD branch."""
    return sum(sc.error(s, *(svd_r(sc.flat * s.double().repeat_interleave(sc.flat.shape[1] // len(s)), r, method)
                             if r else (None, None))) for sc, r in zip(scorers, ranks))


def _refine(scorer: _Scorer, s: torch.Tensor, rank: int, iters: int, method: str) -> dict[str, Any]:
    """SVDQuant's refinement: ``L <- SVD_r(W' - Q(W' - L))`` while the scored output error improves."""
    ws = scorer.flat * s.double().repeat_interleave(scorer.flat.shape[1] // len(s))
    xq = scorer.quantize_input(scorer.x / scorer._shape(s), s)
    l1, l2 = svd_r(ws, rank, method)
    best = first = scorer.error(s, l1, l2, xq)
    steps = 0
    for _ in range(iters):
        n1, n2 = svd_r(ws - scorer.residual_q(ws - l1 @ l2).double(), rank, method)
        err = scorer.error(s, n1, n2, xq)
        if err >= best:
            break
        best, l1, l2, steps = err, n1, n2, steps + 1
    return {"l1": l1, "l2": l2, "err_svd": first, "err_lowrank": best, "refine_steps": steps}


# ------------------------------------------------------------------------------------------------ folding
def _layout_users(node: fx.Node) -> list[fx.Node]:
    """The non-layout nodes that consume ``node``, looking through layout ops."""
    out = []
    for user in node.users:
        if user.op == "call_function" and _op_name(user) in _LAYOUT:
            out += _layout_users(user)
        else:
            out.append(user)
    return out


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _norm_before(graph, layer_nodes: list[fx.Node]) -> tuple[str, fx.Node] | None:
    """The norm module whose output reaches exactly these layer nodes through layout ops, or None."""
    n = layer_nodes[0].args[0]
    while isinstance(n, fx.Node) and n.op == "call_function" and _op_name(n) in _LAYOUT:
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if _op_name(n) == "getitem":  # native_* norms return (out, mean, rstd)
        n = n.args[0]
    if _op_name(n) not in _NORMS:
        return None
    users = _layout_users(n) if _op_name(n) in ("layer_norm", "group_norm") else \
        [u2 for u in n.users if _op_name(u) == "getitem" and u.args[1] == 0 for u2 in _layout_users(u)]
    if set(users) != set(layer_nodes):
        return None
    return graph.module_name(n), n


def _try_fold(denoiser: Denoiser, norm_name: str, first_layer: nn.Module, s: torch.Tensor, batch: tuple,
              channel_dim: int) -> bool:
    """Divide the norm's affine parameters by ``s``; keep it if the layer's input becomes exactly ``x / s`` on
    ``batch``, else undo it. Returns whether it was kept."""
    norm = denoiser.get_submodule(norm_name)
    if not isinstance(norm, (nn.LayerNorm, nn.GroupNorm)) or getattr(norm, "weight", None) is None \
            or norm.weight.numel() != len(s):
        return False
    seen = []
    with hooks([(first_layer, "pre", lambda m, a: seen.append(a[0].detach().clone()))]), torch.no_grad(), \
            eval_mode(denoiser):
        denoiser(*batch)
        saved = (norm.weight.detach().clone(), None if norm.bias is None else norm.bias.detach().clone())
        norm.weight.data /= s.view(norm.weight.shape)
        if norm.bias is not None:
            norm.bias.data /= s.view(norm.bias.shape)
        denoiser(*batch)
    shape = [1] * seen[0].dim()
    shape[channel_dim] = -1
    want = seen[0] / s.view(shape)
    if torch.allclose(seen[1], want, rtol=1e-4, atol=1e-6 * float(want.abs().max())):
        return True
    norm.weight.data.copy_(saved[0])
    if saved[1] is not None:
        norm.bias.data.copy_(saved[1])
    return False


# ------------------------------------------------------------------------------------------------ the pass
@dataclass
class LowRankReport:
    """Per layer: rank, smoothing factor's alpha and where it went, and the scored output errors (relative MSE):
    round to nearest, smoothing only, plain SVD, refined."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.layers:
            return "lowrank: no layer absorbed"
        where = {}
        for layer in self.layers:
            key = layer["smooth"].split(" ")[0]
            where[key] = where.get(key, 0) + 1
        mean = {k: sum(layer[k] for layer in self.layers) / len(self.layers)
                for k in ("err_rtn", "err_smooth", "err_lowrank")}
        ranks = sorted({layer["rank"] for layer in self.layers})
        return (f"lowrank: {len(self.layers)} layers, ranks {ranks}, smoothing {where}; mean layer output error "
                f"(relative MSE, simulated quantization): round to nearest {mean['err_rtn']:.4g}, smoothed "
                f"{mean['err_smooth']:.4g}, smoothed + low-rank {mean['err_lowrank']:.4g}; {self.seconds:.1f} s")


def _rule(layer, module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or conv_padding(module) is None):
        return "grouped or non-zero-padded convolution"
    return None


def lowrank_(denoiser: Denoiser, config: LowRankConfig | None = None, calibration: CalibrationSet | None = None,
             *, progress: bool = True) -> LowRankReport:
    """Smooth and split the layers of ``denoiser`` in place (then quantize it with the same settings).

    >>> import diffpress
    >>> from diffpress.calibration import collect, TimestepPolicy
    >>> den = diffpress.load("digits-dit")
    >>> cs = collect(den, num_samples=2, steps=10, policy=TimestepPolicy("uniform", count=2), progress=False)
    >>> report = lowrank_(den, LowRankConfig(rank=8, alpha_grid=[0.5]), cs, progress=False)
    >>> all(layer["err_lowrank"] <= layer["err_svd"] for layer in report.layers)
    True
    """
    config = config or LowRankConfig()
    if not isinstance(denoiser, Denoiser):
        raise DiffpressError("lowrank_ takes a diffpress.Denoiser; wrap your module: Denoiser(module, sample_shape=...)")
    if calibration is None:
        raise DiffpressError("lowrank_ needs a calibration set (activation statistics): diffpress.calibrate(denoiser, ...)")
    start = time.perf_counter()
    graph = capture(denoiser, batch=2)
    selection = select_layers(denoiser, graph, skip_roles=config.skip_roles, skip=config.skip, rule=_rule)
    report = LowRankReport(skipped=[{"name": s["name"], "reason": s["reason"]} for s in selection.skipped])
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    by_input: dict[Any, list] = {}
    for layer, module in selection.chosen:  # layers reading one tensor share one smoothing factor
        by_input.setdefault(nodes[layer.node].args[0], []).append((layer.name, module, nodes[layer.node]))
    groups = list(by_input.values())
    inputs = _collect(denoiser, calibration, [[(n, m) for n, m, _ in g] for g in groups], config, progress)
    gen = torch.Generator().manual_seed(config.seed)
    batch = next(iter(calibration.batches(2)))
    candidates = ([None] + [float(a) for a in config.alpha_grid]) if config.alpha is None else [config.alpha]
    if not config.smooth:
        candidates = [None]
    for group, inp in tqdm(list(zip(groups, inputs)), desc="lowrank: smoothing + SVD", disable=not progress,
                           leave=False):
        x = inp.data(config.tokens if inp.channel_dim == -1 else config.maps, gen)
        scorers = [_Scorer(m, x, inp, config) for _, m, _ in group]
        ranks = [_rank(config, name, m) for name, m, _ in group]
        x_abs = inp.absmax(config.act_stat)
        w_abs = torch.stack([m.weight.detach().abs().transpose(0, 1).reshape(len(x_abs), -1).amax(1)
                             for _, m, _ in group]).amax(0)
        none = torch.ones_like(x_abs)
        err_rtn = [sc.error(none, None, None) for sc in scorers]
        scores = {a: _group_error(scorers, ranks, smoothing_factor(x_abs, w_abs, a), config.svd)
                  for a in candidates} if len(candidates) > 1 else {candidates[0]: 0.0}
        alpha = min(scores, key=scores.get)
        s = smoothing_factor(x_abs, w_abs, alpha)
        where = "none"
        if alpha is not None:
            found = _norm_before(graph, [node for _, _, node in group]) if config.fold else None
            if found and _try_fold(denoiser, found[0], group[0][1], s, batch, inp.channel_dim):
                where = f"folded into {found[0]}"
            else:
                where = "mul" + (f" (the norm {found[0]} did not fold exactly)" if found else "")
        for (name, module, _), sc, r, e_rtn in zip(group, scorers, ranks, err_rtn):
            refined = _refine(sc, s, r, config.refine_iters, config.svd) if r else None
            err_smooth = sc.error(s, None, None)
            _install(denoiser, name, module, s, where.startswith("mul"), refined, r, config)
            report.layers.append({
                "name": name, "kind": "linear" if isinstance(module, nn.Linear) else "conv2d", "rank": r,
                "alpha": alpha, "smooth": where, "err_rtn": e_rtn, "err_smooth": err_smooth,
                "err_svd": refined["err_svd"] if refined else err_smooth,
                "err_lowrank": refined["err_lowrank"] if refined else err_smooth,
                "refine_steps": refined["refine_steps"] if refined else 0})
    report.seconds = time.perf_counter() - start
    denoiser.compression.append({"pass": "lowrank", "config": asdict(config), "layers": [
        {k: layer[k] for k in ("name", "kind", "rank", "alpha", "smooth")} for layer in report.layers]})
    return report


def _install(denoiser: Denoiser, name: str, module: nn.Module, s: torch.Tensor, in_graph: bool,
             refined: dict | None, rank: int, config: LowRankConfig) -> None:
    """Replace ``module`` by a :class:`LowRankLayer` holding ``W * s - L1 @ L2`` and the branch."""
    w = module.weight.detach()
    shape = [1, -1] + [1] * (w.dim() - 2)
    ws = w.double() * s.double().view(shape)
    residual = copy.deepcopy(module)
    if refined is not None:
        ws = ws - (refined["l1"] @ refined["l2"]).reshape(w.shape)
    residual.weight.data = ws.to(w.dtype)
    new = LowRankLayer(residual, rank, in_graph, getattr(torch, config.branch_dtype))
    new.inv_smooth.copy_((1 / s).float())
    if refined is not None:
        new.branch.set(refined["l1"].float(), refined["l2"].float())
    set_submodule(denoiser, name, new)


def restore_lowrank(denoiser: Denoiser, record: dict[str, Any]) -> None:
    """Rebuild the low-rank layers of a saved model (values come from its state dict; folded factors live in the
    norms' saved parameters)."""
    config = LowRankConfig(**record["config"])
    for layer in record["layers"]:
        module = denoiser.get_submodule(layer["name"])
        set_submodule(denoiser, layer["name"], LowRankLayer(module, layer["rank"], layer["smooth"].startswith("mul"),
                                                             getattr(torch, config.branch_dtype)))
    denoiser.compression.append(record)


def _onnx_fp16_branch(model, record: dict[str, Any]) -> dict[str, Any]:
    """With ``branch_dtype: float16``, store the branch weights as FLOAT16 initializers followed by a Cast (the
    exporter folds the module's upcast into FLOAT ones). A FLOAT initializer read only by MatMul / Gemm / Conv
    whose values survive a round trip through fp16 exactly is taken for a branch weight; the values do not
    change, only their storage."""
    facts = {"lowrank_branch_fp16_initializers": 0}
    if record["config"].get("branch_dtype") != "float16":
        return facts
    import numpy as np
    import onnx_ir as ir

    count = 0
    for name, value in list(model.graph.initializers.items()):
        arr = value.const_value.numpy() if value.const_value is not None else None
        uses = value.uses()
        if arr is None or arr.dtype != np.float32 or arr.ndim < 2 or not uses or \
                any(u.node.op_type not in ("MatMul", "Gemm", "Conv") for u in uses):
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr):
            continue
        stored = ir.Value(name=f"{name}_fp16", shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT16),
                          const_value=ir.tensor(half, name=f"{name}_fp16"))
        model.graph.register_initializer(stored)
        cast = ir.node("Cast", [stored], attributes={"to": ir.DataType.FLOAT}, name=f"{name}_upcast")
        model.graph.insert_before(uses[0].node, cast)
        for use in list(uses):
            use.node.replace_input_with(use.idx, cast.outputs[0])
        model.graph.initializers.pop(name)
        count += 1
    return {"lowrank_branch_fp16_initializers": count}


def _recipe_check(config: LowRankConfig, others: dict[str, Any]) -> str | None:
    """The quantizers the search simulates must be the ones the quantize pass builds."""
    q = others.get("quantize")
    if q is None:
        return None
    for key in ("weights", "group_size", "activations", "act_mode", "act_group_size"):
        if getattr(q, key) != getattr(config, key):
            return (f"lowrank.{key} is {getattr(config, key)!r} but quantize.{key} is {getattr(q, key)!r}: the lowrank "
                    "search simulates the quantizers of the quantize pass; set both the same")
    return None


register(PassSpec(
    "lowrank", LowRankConfig, lambda den, config, calibration, progress: lowrank_(den, config, calibration,
                                                                                   progress=progress),
    restore_lowrank, after=("prune",), once=True,
    description="low-rank outlier absorption: SmoothQuant-style smoothing + an SVD branch kept in float (SVDQuant)",
    onnx_ops=lambda record: ("MatMul", "Gemm", "Conv") if any(layer["rank"] for layer in record["layers"]) else (),
    recipe_check=_recipe_check,
    onnx_rewrite=_onnx_fp16_branch,
    io_spec_defaults={"lowrank_branch_fp16_initializers": 0},
))
