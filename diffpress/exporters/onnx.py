"""export_onnx(): a Denoiser (float or quantized) to ONNX with standard Q/DQ, verified in ONNX Runtime.

``torch.onnx.export(dynamo=True)`` at opset 21 by default. Quantized layers become QuantizeLinear /
DequantizeLinear with integer initializers (int8 per-channel, or blocked int4 retyped to INT4 after
export); timestep-grouped activation scales are gathered in the graph from the timestep input, which
ONNX Runtime still fuses into QLinearConv / QLinearMatMul. Each export writes ``io_spec.json`` and is
checked: ONNX Runtime against PyTorch on the same inputs, at two batch sizes.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import nn

from diffpress._io import atomic_dir
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError

QD = torch.ops.quantized_decomposed
SPEC_FORMAT = "diffpress.io_spec/1"


# -- translations for the quantized_decomposed ops the stock exporter cannot take with tensor qparams -------------
def _translations(opset: int) -> dict:
    """Written with the target opset's onnxscript ops (an opset-21 ``Cast`` carries attributes that an
    opset-18 runtime rejects)."""
    import onnxscript.onnx_opset
    from onnxscript import ir

    op = getattr(onnxscript.onnx_opset, f"opset{opset}")

    def q_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype):
        return op.QuantizeLinear(input, op.Cast(scale, to=ir.DataType.FLOAT), op.Cast(zero_point, to=dtype))

    def dq_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype, out_dtype=None):
        return op.DequantizeLinear(input, op.Cast(scale, to=ir.DataType.FLOAT), op.Cast(zero_point, to=dtype))

    def dq_group(input, scales, zero_points, quant_min: int, quant_max: int, dtype, group_size: int,
                 output_dtype=None):
        # Emitted as the [K, N] layout blocked along axis 0: what ONNX Runtime fuses (DQ + MatMul -> MatMulNBits)
        wt = op.Transpose(input, perm=[1, 0])
        st = op.Transpose(op.Cast(scales, to=ir.DataType.FLOAT), perm=[1, 0])
        return op.Transpose(op.DequantizeLinear(wt, st, axis=0, block_size=group_size), perm=[1, 0])

    return {QD.quantize_per_tensor.tensor: q_per_tensor, QD.dequantize_per_tensor.tensor: dq_per_tensor,
            QD.dequantize_per_channel_group.default: dq_group}


def _retype_int4(path: Path) -> int:
    """Store int8 initializers that only feed blocked DequantizeLinear and fit in [-8, 7] as INT4."""
    import ml_dtypes
    import onnx_ir as ir

    model = ir.load(str(path))
    n = 0
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.attributes.get("block_size") is None:
            continue
        v = node.inputs[0]
        if v is None or v.const_value is None or v.dtype != ir.DataType.INT8:
            continue
        if any(u.node.op_type != "DequantizeLinear" for u in v.uses()):
            continue
        arr = v.const_value.numpy()
        if arr.min() < -8 or arr.max() > 7:
            continue
        v.const_value = ir.tensor(arr.astype(ml_dtypes.int4), dtype=ir.DataType.INT4, name=v.name)
        v.dtype = ir.DataType.INT4
        n += 1
    ir.save(model, str(path), external_data=path.name + ".data" if _has_external(path) else None)
    return n


def _strip_metadata(model) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces, module paths, class hierarchies):
    on small quantized models it outweighs the int8 weights."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def _has_external(path: Path) -> bool:
    return (path.parent / (path.name + ".data")).exists()


class _Exportable(nn.Module):
    """Named, positional inputs for export: sample, timestep[, class_labels | encoder_hidden_states]."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, sample, timestep, cond=None):
        return self.denoiser(sample, timestep, cond)


def io_names(denoiser: Denoiser) -> list[str]:
    cond = {"none": [], "class": ["class_labels"], "hidden_states": ["encoder_hidden_states"]}[denoiser.cond_kind]
    return ["sample", "timestep", *cond]


def example_feed(denoiser: Denoiser, batch: int, sample_shape=None, seed: int = 0) -> tuple:
    """Inputs in the exported convention: timestep float32 (batch,)."""
    x, t, cond = denoiser.example_inputs(batch, sample_shape, seed)
    t = torch.linspace(999.0, 1.0, batch) if batch > 1 else torch.tensor([499.0])
    return (x, t) if cond is None else (x, t, cond)


@dataclass
class ExportResult:
    """Where the export went and how it was checked."""

    path: Path
    spec: dict[str, Any]
    verification: dict[str, Any] = field(default_factory=dict)
    op_types: dict[str, int] = field(default_factory=dict)
    ort_op_types: dict[str, int] = field(default_factory=dict)


def _op_counts(model) -> dict[str, int]:
    c = Counter((n.domain + "::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    return dict(sorted(c.items()))


def ort_session(path: str | Path, threads: int = 0, optimized_path: str | Path | None = None,
                nbits_accuracy_level: int = 0):
    """An ONNX Runtime CPU session; ``nbits_accuracy_level=0`` keeps MatMulNBits exact (level 4 would quantize
    the activations on the fly, an error of its own that the PyTorch simulation does not model)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(nbits_accuracy_level))
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        # large models: write the optimized graph's weights beside it (one protobuf cannot exceed 2 GB)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(optimized_path).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def supported_opsets() -> range:
    """The ONNX opsets ``export_onnx`` can target: 18 (the dynamo exporter's oldest) to onnxscript's newest."""
    import onnxscript.onnx_opset

    newest = max(int(n[len("opset"):]) for n in dir(onnxscript.onnx_opset) if n[len("opset"):].isdigit())
    return range(18, newest + 1)


def export_onnx(
    denoiser: Denoiser,
    out_dir: str | Path,
    *,
    opset: int = 21,
    batch: int = 2,
    sample_shape: tuple[int, int, int] | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float | None = None,
    force: bool = False,
) -> ExportResult:
    """Export ``denoiser`` to ``out_dir/model.onnx`` (+ ``io_spec.json``) and verify it in ONNX Runtime.

    ``rtol`` bounds the relative RMS difference between ONNX Runtime and PyTorch (default 1e-4 for a float
    model, 5e-2 for a quantized one: ONNX Runtime's integer kernels requantize in fixed point and may round
    a value one step differently from the float simulation, which the next layers spread. Measured: 0.2 to
    0.4 % on the trained digits-cond-unet (W8A8, one or two timestep groups); 1 to 4.5 % on random-weight
    UNets, whose activations have no structure to absorb the flips). The check runs at the export batch
    and at another batch size.

    >>> import diffpress, tempfile, pathlib
    >>> res = export_onnx(diffpress.load("digits-dit"), pathlib.Path(tempfile.mkdtemp()) / "dit")
    >>> res.verification["passed"], res.spec["inputs"][0]["name"]
    (True, 'sample')
    """
    import onnx

    if opset not in supported_opsets():
        raise DiffpressError(f"opset {opset} is not supported: torch.onnx's dynamo exporter needs >= 18 and this "
                             f"onnxscript knows up to {supported_opsets()[-1]} (default 21)")
    quantized = bool(denoiser.compression)
    int4 = any(layer.get("weight_bits") == 4 for rec in denoiser.compression for layer in rec.get("layers", []))
    if int4 and opset < 21:
        raise DiffpressError(f"int4 weights need opset >= 21 (blocked DequantizeLinear), got {opset}")
    rtol = rtol if rtol is not None else (5e-2 if quantized else 1e-4)
    names = io_names(denoiser)
    # torch.export specializes a dimension of size 1, so a dynamic batch is traced at 2 or more
    args = example_feed(denoiser, max(batch, 2) if dynamic_batch else batch, sample_shape)
    dynamic = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: b} for _ in args)
    with atomic_dir(out_dir, force=force) as tmp:
        path = tmp / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with eval_mode(denoiser):
                    program = torch.onnx.export(
                        _Exportable(denoiser), args, dynamo=True, opset_version=opset, input_names=names,
                        output_names=["out_sample"], dynamic_shapes=dynamic,
                        custom_translation_table=_translations(opset), verbose=False)
            except Exception as exc:  # noqa: BLE001 - report the exporter's failure in one line
                raise DiffpressError(f"torch.onnx.export failed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        _strip_metadata(program.model)
        program.save(str(path), external_data=sum(p.numel() for p in denoiser.parameters()) > 100_000_000)
        int4_count = _retype_int4(path) if int4 else 0
        model = onnx.load(str(path), load_external_data=False)
        ops = _op_counts(model)
        if quantized and not (ops.get("QuantizeLinear", 0) or ops.get("DequantizeLinear", 0)):
            raise DiffpressError("the model is quantized but the exported graph has no Q/DQ nodes; "
                                 "the quantized layers were lost in export")
        spec = {
            "format": SPEC_FORMAT,
            "opset": opset,
            "inputs": [{"name": n, "shape": ["batch", *map(int, a.shape[1:])], "dtype": str(a.dtype).replace("torch.", "")}
                       for n, a in zip(names, args)],
            "outputs": [{"name": "out_sample", "shape": ["batch", *denoiser.sample_shape], "dtype": "float32"}],
            "timestep": "float32 (batch,): the scheduler's timestep value (0 .. num_train_timesteps-1); all items "
                        "of a batch share one timestep when the model has timestep-grouped quantizers",
            "prediction_type": denoiser.prediction_type,
            "null_label": denoiser.null_label,
            "scheduler": denoiser.scheduler_config,
            "quantized": quantized,
            "int4_initializers": int4_count,
            "dynamic_batch": dynamic_batch,
        }
        result = ExportResult(out_dir if isinstance(out_dir, Path) else Path(out_dir), spec, op_types=ops)
        if verify:
            result.verification, result.ort_op_types = _verify(denoiser, path, tmp, batch, sample_shape, rtol,
                                                                dynamic_batch)
            spec["verification"] = result.verification
        (tmp / "io_spec.json").write_text(json.dumps(spec, indent=2, default=str) + "\n")
    return result


def _verify(denoiser: Denoiser, path: Path, tmp: Path, batch: int, sample_shape, rtol: float,
            dynamic_batch: bool) -> tuple[dict[str, Any], dict[str, int]]:
    import onnx

    optimized = tmp / "model.ort-optimized.onnx"
    sess = ort_session(path, optimized_path=optimized)
    ort_ops = _op_counts(onnx.load(str(optimized), load_external_data=False))
    optimized.unlink()
    for extra in tmp.glob("model.ort-optimized.onnx*"):
        extra.unlink()
    checks = []
    for b, seed in ((batch, 1), (batch + 1 if dynamic_batch else batch, 2)):
        args = example_feed(denoiser, b, sample_shape, seed)
        with torch.no_grad(), eval_mode(denoiser):
            ref = denoiser(*args).numpy()
        got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
        rel = float(np.sqrt(np.mean((got - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12))
        checks.append({"batch": b, "max_abs_diff": float(np.abs(got - ref).max()), "rel_rms_diff": rel})
    passed = all(c["rel_rms_diff"] <= rtol for c in checks)
    verification = {"runtime": "onnxruntime CPU", "rtol": rtol, "checks": checks, "passed": passed}
    if not passed:
        raise DiffpressError(f"ONNX Runtime disagrees with PyTorch beyond rtol={rtol}: {checks}")
    return verification, ort_ops
