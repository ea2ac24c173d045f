"""Timestep-aware post-training quantization: ``quantize_(denoiser, config, calibration)``.

Weights: int8 or int4, symmetric, per output channel or per group. Activations: static int8 per
tensor, the range taken from per-timestep statistics by a named rule, or kept as K timestep groups
picked at run time from ``t``. Layers whose input is a UNet skip-concat get one quantizer per part
(Q-Diffusion's split). Which layers stay in float is decided by role (from the graph) and glob
patterns, and every skipped layer is reported with its reason. Optionally the rounding of the weights
is learned block by block (``reconstruct``, BRECQ/AdaRound, see :mod:`diffpress.compress.reconstruct`)
and each layer's mean output error is moved into its bias (``bias_correction``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from diffpress.calibration.dataset import CalibrationSet
from diffpress.calibration.observers import observe
from diffpress.compress.quant import (
    RANGE_RULES,
    ActQuant,
    DynamicActQuant,
    QuantConv2d,
    QuantLinear,
    act_group,
    act_qparams,
    aggregate_range,
    conv_padding,
    timestep_groups,
)
from diffpress.compress.reconstruct import (
    ReconstructConfig,
    calibration_batches,
    correct_bias,
    reconstruct,
)
from diffpress.compress.registry import PassSpec, register
from diffpress.compress.select import check_roles, matches, select_layers, set_submodule
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError, check_allowed
from diffpress.graph import capture
from diffpress.runtime import RunContext


@dataclass
class QuantizeConfig:
    """What to quantize and how. Defaults: W8A8, per-channel weights, one MSE-optimal activation range.

    >>> QuantizeConfig(weights="int4", group_size=32).weight_bits
    4
    >>> QuantizeConfig(weights="int3")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: weights: 'int3' is not allowed; allowed: int8, int4
    """

    weights: str = "int8"
    group_size: int | None = None  # None: per output channel; N: groups of N input elements
    # a layer whose input size group_size does not divide: "skip" (left in float) or "per_channel"
    group_fallback: str = "skip"
    activations: str | None = "int8"  # "int4" too; None: weight-only
    # "static": per tensor, ranges calibrated over the trajectory (timestep groups); "dynamic": per token, groups of
    # act_group_size channels, ranges taken at run time (SVDQuant's 4-bit activations; exported as float arithmetic)
    act_mode: str = "static"
    act_group_size: int = 64
    act_rule: str = "mse"
    percentile: float = 99.99
    timestep_groups: int = 1
    symmetric_activations: bool = False  # True for TensorRT-style targets
    quantize_outputs: bool = True  # requantize layer outputs: what ONNX Runtime's QLinearConv/QLinearMatMul need
    split_concat: bool = True
    skip_roles: list[str] = field(default_factory=lambda: ["time_embedding", "first", "last"])
    skip: list[str] = field(default_factory=list)  # glob patterns over module names
    # "int8": layers kept in float by skip_roles still get int8 per-channel weights (activations stay
    # float): for DiT adaLN / time MLPs, which hold many weights but little compute
    skip_roles_weights: str | None = None
    batch_size: int = 32
    reconstruct: ReconstructConfig | None = None  # None: round to nearest (the fast path)
    # move each layer's mean output error (measured on up to reconstruct.samples calibration points, 256 by
    # default) into its bias; costs one forward pass per corrected layer over those points
    bias_correction: bool = False
    # how exported ONNX graphs store int4 weights: "int4" (INT4 initializers: half the bytes; ONNX Runtime has
    # no int4 convolution kernel, so it dequantizes those weights at each call, and it fuses blocked int4
    # linears into MatMulNBits) or "int8" (the int4 values in INT8 initializers: 8-bit size, but the integer
    # QLinearConv / QLinearMatMul kernels run them; blocked weights stay INT4 for MatMulNBits)
    int4_export: str = "int4"
    # the CPUs the int8 model is for (TARGETS): "any" keeps int8 weights of W8A8 layers on 7 bits, so that
    # ONNX Runtime's integer kernels agree with the simulation on every x86 CPU, AVX2-only ones included
    target: str = "any"

    def __post_init__(self) -> None:
        if isinstance(self.reconstruct, dict):
            allowed = [f.name for f in fields(ReconstructConfig)]
            unknown = sorted(set(self.reconstruct) - set(allowed))
            if unknown:
                raise DiffpressError(f"reconstruct.{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
            self.reconstruct = ReconstructConfig(**self.reconstruct)
        elif self.reconstruct is not None and not isinstance(self.reconstruct, ReconstructConfig):
            raise DiffpressError(f"reconstruct: expected a ReconstructConfig, a mapping of its fields or null "
                                 f"(off), got {self.reconstruct!r}")
        check_allowed("weights", self.weights, ("int8", "int4"))
        check_allowed("activations", self.activations, ("int8", "int4", None))
        check_allowed("act_mode", self.act_mode, ACT_MODES)
        if self.act_group_size < 1:
            raise DiffpressError(f"act_group_size: must be a positive integer, got {self.act_group_size}")
        check_allowed("act_rule", self.act_rule, RANGE_RULES)
        check_roles("skip_roles", self.skip_roles)
        check_allowed("skip_roles_weights", self.skip_roles_weights, ("int8", None))
        check_allowed("int4_export", self.int4_export, ("int4", "int8"))
        check_allowed("group_fallback", self.group_fallback, ("skip", "per_channel"))
        check_allowed("target", self.target, TARGETS)
        if self.group_size is not None and self.group_size < 1:
            raise DiffpressError(f"group_size: must be a positive integer or null, got {self.group_size}")
        if self.timestep_groups < 1:
            raise DiffpressError(f"timestep_groups: must be >= 1, got {self.timestep_groups}")
        if not 50 < self.percentile <= 100:
            raise DiffpressError(f"percentile: must be in (50, 100], got {self.percentile}")

    @property
    def weight_bits(self) -> int:
        """Bits of the weight grid: 8 or 4; 7 for int8 weights of integer-kernel (W8A8) layers for target ``any``."""
        bits = int(self.weights[3:])
        return 7 if bits == 8 and self.integer_kernels and self.target == "any" else bits

    @property
    def act_bits(self) -> int:
        return int(self.activations[3:]) if self.activations else 0

    @property
    def integer_kernels(self) -> bool:
        """Whether the layers are meant for integer kernels with requantized outputs (static int8 activations):
        ONNX Runtime has no 4-bit activation kernel and none for per-token dynamic scales."""
        return self.activations == "int8" and self.act_mode == "static"


@dataclass
class QuantizeReport:
    """Which layers were quantized (with their settings) and which stayed in float, and why."""

    quantized: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)  # one record per block, if reconstructed
    bias_corrected: int = 0  # layers whose bias absorbed their mean output error

    def summary(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers, {len(self.skipped)} left in float"]
        if self.reconstruction:
            learned = sum(r["result"] == "adaround" for r in self.reconstruction)
            lines.append(f"reconstruction: learned rounding kept in {learned} of {len(self.reconstruction)} blocks")
            lines += [f"  {r['block']}: {r['result']}" for r in self.reconstruction if r["result"] != "adaround"]
        if self.bias_corrected:
            lines.append(f"bias correction: {self.bias_corrected} layers")
        lines += [f"  float: {s['name']} ({s['reason']})" for s in self.skipped]
        return "\n".join(lines)


def _pass_rule(config: QuantizeConfig):
    """The quantize pass's own rules, after the shared ones (see :func:`diffpress.compress.select.select_layers`)."""
    def rule(layer, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module, nn.Conv2d) and conv_padding(module) is None:
            return (f"padding {module.padding!r} / padding_mode {module.padding_mode!r}: only zero padding, the same on "
                    "both sides of each axis, is quantized")
        split = layer.concat_split if (config.split_concat and layer.op == "conv2d") else None
        if config.group_fallback == "skip" and _layer_group(module, split, config.group_size) != config.group_size:
            return f"group_size {config.group_size} does not divide the input size {_input_parts(module, split)}"
        return None
    return rule


def _input_parts(module: nn.Module, split: int | None) -> list[int]:
    fan_in = module.weight[0].numel()
    if split is None:
        return [fan_in]
    return [split * fan_in // module.in_channels, (module.in_channels - split) * fan_in // module.in_channels]


def _layer_group(module: nn.Module, split: int | None, group_size: int | None) -> int | None:
    """``group_size`` if it divides every input part of ``module``, else None (per output channel)."""
    if group_size is None or any(p % group_size for p in _input_parts(module, split)):
        return None
    return group_size


def quantize_(denoiser: Denoiser, config: QuantizeConfig | None = None,
              calibration: CalibrationSet | None = None, *, progress: bool = True) -> QuantizeReport:
    """Quantize ``denoiser`` in place; activation ranges come from ``calibration``.

    >>> import diffpress
    >>> from diffpress.calibration import collect, TimestepPolicy
    >>> den = diffpress.load("digits-unet")
    >>> cs = collect(den, num_samples=4, steps=10, policy=TimestepPolicy("uniform", count=4), progress=False)
    >>> report = quantize_(den, QuantizeConfig(timestep_groups=2), cs, progress=False)
    >>> len(report.quantized) > 0, report.skipped[0]["reason"]
    (True, 'role time_embedding (skip_roles)')
    """
    config = config or QuantizeConfig()
    if not isinstance(denoiser, Denoiser):
        raise DiffpressError("quantize_ takes a diffpress.Denoiser; wrap your module: Denoiser(module, sample_shape=...)")
    static = bool(config.activations) and config.act_mode == "static"
    if (static or config.reconstruct or config.bias_correction) and calibration is None:
        raise DiffpressError("static activation quantization, reconstruction and bias correction need a calibration "
                             "set: diffpress.calibrate(denoiser, ...)")
    # the float model the quantized layers are fitted to
    reference = denoiser.copy() if (config.reconstruct or config.bias_correction) else None
    graph = capture(denoiser, batch=2)
    report = QuantizeReport(config=asdict(config))
    selection = select_layers(denoiser, graph, skip_roles=config.skip_roles, skip=config.skip,
                              rule=_pass_rule(config))
    chosen: dict[str, int | None] = {
        layer.name: layer.concat_split if (config.split_concat and layer.op == "conv2d") else None
        for layer, _ in selection.chosen}
    for skipped in selection.skipped:
        module = denoiser.get_submodule(skipped["name"])
        if skipped["rule"] == "role" and config.skip_roles_weights == "int8" and not matches(skipped["name"], config.skip) \
                and _plain_layer(module):
            spec = _spec(skipped["name"], module, weight_bits=8, group_size=None, split=None, acts={}, weight_only=True)
            set_submodule(denoiser, skipped["name"], _build(module, spec, {}, denoiser.runtime))
            report.quantized.append(spec)
        else:
            report.skipped.append({"name": skipped["name"], "reason": skipped["reason"]})
    stats = {}
    if static:
        stats = observe(denoiser, calibration, chosen, outputs=config.quantize_outputs and config.integer_kernels,
                        batch_size=config.batch_size, progress=progress)
    context = denoiser.runtime
    groups = timestep_groups(calibration.timesteps, config.timestep_groups) if static else []
    bounds = [(groups[i][-1] + groups[i + 1][0]) / 2 for i in range(len(groups) - 1)]
    for name, split in chosen.items():
        module = denoiser.get_submodule(name)
        acts = {kind: [_act_quant(part, groups, bounds, config, context) for part in parts]
                for kind, parts in stats.get(name, {}).items()}
        if config.activations and not static:
            acts = {"in": _dynamic_quants(module, split, config.act_bits, config.act_group_size, context)}
        spec = _spec(name, module, weight_bits=config.weight_bits, group_size=_layer_group(module, split, config.group_size),
                     split=split, acts=acts, act_groups=len(groups))
        if acts:
            spec.update(act_bits=config.act_bits, act_mode=config.act_mode)
        set_submodule(denoiser, name, _build(module, spec, acts, context))
        report.quantized.append(spec)
    if reference is not None:
        names = {spec["name"] for spec in report.quantized}
        order = list(dict.fromkeys(layer.name for layer in graph.layers if layer.name in names))
        rc = config.reconstruct or ReconstructConfig()
        data = calibration_batches(calibration, rc.samples, rc.batch_size)
        if config.reconstruct:
            report.reconstruction = reconstruct(denoiser, reference, order, data, rc, progress=progress)
        if config.bias_correction:
            report.bias_corrected = correct_bias(denoiser, reference, order, data, progress=progress)
    denoiser.compression.append({"pass": "quantize", "config": asdict(config), "layers": report.quantized})
    return report


def _spec(name: str, module: nn.Module, *, weight_bits: int, group_size: int | None, split: int | None,
          acts: dict[str, list[ActQuant]], act_groups: int = 0, weight_only: bool = False) -> dict[str, Any]:
    """The per-layer record saved in diffpress.json; restore_quantize rebuilds the module from it."""
    spec = {"name": name, "kind": "linear" if isinstance(module, nn.Linear) else "conv2d",
            "weight_bits": weight_bits, "group_size": group_size, "split": split,
            "act_groups": act_groups if acts else 0, "outputs": "out" in acts}
    if weight_only:
        spec["weight_only"] = True
    return spec


def _plain_layer(module: nn.Module) -> bool:
    """A Linear, or a zero-padded Conv2d: what the quantized modules can replace."""
    return isinstance(module, nn.Linear) or (module.padding_mode == "zeros" and not isinstance(module.padding, str))


def _act_quant(part, groups, bounds, config: QuantizeConfig, context: RunContext) -> ActQuant:
    """One quantizer for one observed tensor: a range per timestep group, by the configured rule."""
    bits = config.act_bits
    qparams = [act_qparams(*aggregate_range([part[t] for t in g], config.act_rule, bits, config.symmetric_activations,
                                            config.percentile), bits, config.symmetric_activations) for g in groups]
    return ActQuant([s for s, _ in qparams], [z for _, z in qparams], bounds, bits, config.symmetric_activations,
                    context)


def _dynamic_quants(module: nn.Module, split: int | None, bits: int, group_size: int,
                    context: RunContext) -> list[DynamicActQuant]:
    """One dynamic per-token quantizer per input part (channels last for a linear, dim 1 for a convolution)."""
    if isinstance(module, nn.Linear):
        return [DynamicActQuant(bits, act_group(module.in_features, group_size), -1, context)]
    widths = [module.in_channels] if split is None else [split, module.in_channels - split]
    return [DynamicActQuant(bits, act_group(w, group_size), 1, context) for w in widths]


def _build(module: nn.Module, spec: dict[str, Any], acts: dict[str, list[ActQuant]], context: RunContext) -> nn.Module:
    if spec["kind"] == "linear":
        return QuantLinear(module, spec["weight_bits"], spec["group_size"],
                           (acts.get("in") or [None])[0], (acts.get("out") or [None])[0], context)
    return QuantConv2d(module, spec["weight_bits"], spec["group_size"], acts.get("in"), acts.get("out"), spec["split"],
                       context)


def restore_quantize(denoiser: Denoiser, record: dict[str, Any]) -> None:
    """Rebuild the quantized modules of a saved model (their values then come from its state dict)."""
    saved = dict(record["config"])
    if "target" not in saved:  # saved before targets existed: full-range int8 unless reduce_range was set
        saved["target"] = "any" if saved.pop("reduce_range", False) else "vnni"
        record["config"] = saved
    config = QuantizeConfig(**saved)
    context = denoiser.runtime
    for spec in record["layers"]:
        module = denoiser.get_submodule(spec["name"])
        acts: dict[str, list[nn.Module]] = {}
        bits = spec.get("act_bits", 8)
        if spec.get("act_mode") == "dynamic":
            acts["in"] = _dynamic_quants(module, spec["split"], bits, config.act_group_size, context)
        elif spec["act_groups"]:
            k, n = spec["act_groups"], 1 if spec["split"] is None else 2
            for kind in ("in", "out") if spec.get("outputs") else ("in",):
                acts[kind] = [ActQuant([1.0] * k, [0] * k, [0.0] * (k - 1), bits, config.symmetric_activations,
                                       context) for _ in range(n)]
        set_submodule(denoiser, spec["name"], _build(module, spec, acts, context))
    denoiser.compression.append(record)


def _onnx_facts(model, record: dict[str, Any]) -> dict[str, Any]:
    """``io_spec.json`` facts of the exported graph (``quantized``, ``int4_initializers``), after storing the
    int4 weights as INT4 initializers (opset 21 DequantizeLinear takes INT4 per axis and blocked); with
    ``int4_export="int8"`` only the blocked ones (per-axis weights stay INT8, for the integer kernels).

    An int4 weight is an int8 constant that feeds only DequantizeLinear, possibly through the Reshape /
    Transpose that lay a blocked weight out (the exporter leaves those unfolded on large tensors: they
    are folded here), and holds values in [-8, 7]. An int8 weight always holds +-127 in each channel (its
    scale is the channel's max / 127; +-63 for target ``any``), so only the int4 layers' weights qualify. Zero points of those
    nodes are dropped (they are 0: symmetric weights)."""
    facts = {"quantized": True, "int4_initializers": 0, "target": target_fact(record)}
    if not any(layer["weight_bits"] == 4 for layer in record["layers"]):
        return facts
    per_axis = record["config"].get("int4_export", "int4") == "int4"
    import ml_dtypes
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    count, made = 0, {}
    for node in list(model.graph.all_nodes()):
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        if not per_axis and not node.attributes.get_int("block_size", 0):
            continue
        arr = _int8_constant(node.inputs[0])
        if arr is None or arr.min() < -8 or arr.max() > 7:
            continue
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        if zp is not None and (zp.const_value is None or zp.const_value.numpy().any()):
            raise DiffpressError(f"int4 weight {node.inputs[0].name} has a non-zero zero point; symmetric int4 "
                                 "was expected")
        source = node.inputs[0]
        if id(source) not in made:  # one INT4 initializer per weight, however many nodes read it
            name = f"{source.name}_int4"
            made[id(source)] = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.INT4),
                                        const_value=ir.tensor(arr.astype(ml_dtypes.int4), dtype=ir.DataType.INT4,
                                                              name=name))
            model.graph.register_initializer(made[id(source)])
            count += 1
        node.replace_input_with(0, made[id(source)])
        if zp is not None:
            node.replace_input_with(2, None)
    RemoveUnusedNodesPass()(model)  # the int8 originals and their layout ops
    return {**facts, "int4_initializers": count}


def target_fact(record: dict[str, Any]) -> dict[str, Any]:
    """The ``target`` entry of io_spec.json: which CPUs the integer kernels of this artifact agree on."""
    name = record["config"].get("target", "vnni")
    bits = sorted({layer["weight_bits"] for layer in record["layers"]})
    return {"name": name, "cpus": TARGETS[name], "weight_bits": bits}


def _int8_constant(value):
    """The numpy value of ``value`` if it is an INT8 constant read only by DequantizeLinear nodes, or reached from
    one through single-use Reshape / Transpose nodes; else None."""
    import onnx_ir as ir

    chain = []
    while value.const_value is None:
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Transpose") or len(value.uses()) != 1:
            return None
        chain.append(node)
        value = node.inputs[0]
    if value.dtype != ir.DataType.INT8:
        return None
    if not chain and any(u.node.op_type != "DequantizeLinear" for u in value.uses()):
        return None
    arr = value.const_value.numpy()
    for node in reversed(chain):
        if node.op_type == "Transpose":
            arr = arr.transpose(node.attributes["perm"].as_ints())
        else:
            shape = node.inputs[1].const_value
            if shape is None:
                return None
            arr = arr.reshape([d if d != 0 else arr.shape[i] for i, d in enumerate(shape.numpy().tolist())])
    return arr


ACT_MODES = ("static", "dynamic")

TARGETS = {
    "any": "every x86 CPU (AVX2, AVX-512 VNNI, AMX) and ARM: int8 weights of W8A8 layers on 7 bits (|q| <= 63), so "
           "ONNX Runtime's u8 x s8 integer kernels never saturate",
    "vnni": "x86 CPUs with AVX-512 VNNI, AVX-VNNI or AMX, ARM, GPUs: full-range int8 weights; x86 CPUs with only "
            "AVX2 run ONNX Runtime's u8 x s8 kernels through VPMADDUBSW, whose int16 pair sums saturate, and drift "
            "from the simulation (1.9-3.4 % measured under emulation)",
}

SIMULATION = ("fake-quant simulation: the PyTorch model rounds values to the integer grid and computes in float; the "
              "exported ONNX graph carries the same scales as Q/DQ nodes, which ONNX Runtime runs on integer kernels")

register(PassSpec(
    "quantize", QuantizeConfig, lambda den, config, calibration, progress: quantize_(den, config, calibration,
                                                                                     progress=progress),
    restore_quantize, after=("prune", "lowrank"), once=True,
    # ranges come from calibration, reconstruction and bias correction fit to it; weight-only RTN needs none
    needs_calibration=lambda c: (c.activations is not None and c.act_mode == "static") or c.reconstruct is not None
    or c.bias_correction,
    description="timestep-aware post-training quantization (int8 / int4 weights; int8 / int4 activations, static "
                "per tensor or dynamic per token)",
    simulated=SIMULATION,
    # ONNX Runtime's integer kernels requantize in fixed point and may round a value one step differently from
    # the float simulation, which the next layers spread. Measured: 0.2 to 0.4 % on the trained
    # digits-cond-unet (W8A8, one or two timestep groups); 1 to 4.5 % on random-weight UNets
    export_rtol=5e-2,
    onnx_ops=lambda record: ("QuantizeLinear", "DequantizeLinear") if record["layers"] else (),
    min_opset=lambda c: (21, "int4 weights need opset >= 21 (INT4 initializers, blocked DequantizeLinear)")
    if c.weights == "int4" else (0, ""),
    onnx_rewrite=_onnx_facts,
    io_spec_defaults={"quantized": False, "int4_initializers": 0, "target": None},
))
