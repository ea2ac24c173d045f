"""export_onnx(): a Denoiser (float or compressed) to ONNX, every graph of its export plan verified in ONNX Runtime.

``torch.onnx.export(dynamo=True)`` at opset 21 by default. Quantized layers become QuantizeLinear /
DequantizeLinear with integer initializers (the quantize pass retypes int4 weights to INT4 after export);
timestep-grouped activation scales are gathered in the graph from the timestep input, which ONNX Runtime
still fuses into QLinearConv / QLinearMatMul. What the artifact holds (graphs, files), the tolerance it is
checked at and the op types it must contain come from the model's passes (:mod:`.plan`). Each export
writes ``io_spec.json`` and is checked: ONNX Runtime against PyTorch on the same inputs, at two batch sizes.
"""
from __future__ import annotations

import contextlib
import inspect
import platform
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

from diffpress._io import atomic_dir
from diffpress.compress import registry
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError
from diffpress.exporters.cpu import cpu_flags, integer_kernels_agree
from diffpress.exporters.plan import (ExportPlan, GraphSpec, build_plan, describe, example_feed, io_names,  # noqa: F401
                                      rel_rms, write_io_spec)

QD = torch.ops.quantized_decomposed


# -- translations for the quantized_decomposed ops the stock exporter cannot take with tensor qparams -------------
def _translations(opset: int) -> dict:
    """Written with the target opset's onnxscript ops (an opset-21 ``Cast`` carries attributes that an
    opset-18 runtime rejects)."""
    import onnxscript.onnx_opset
    from onnxscript import ir

    op = getattr(onnxscript.onnx_opset, f"opset{opset}")

    def narrow(dtype, quant_min: int, quant_max: int):
        # 4-bit activations travel in 8-bit torch storage; ONNX has the 4-bit types (opset 21) that saturate right
        return {(0, 15): ir.DataType.UINT4, (-8, 7): ir.DataType.INT4}.get((quant_min, quant_max), dtype)

    def q_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype):
        return op.QuantizeLinear(input, op.Cast(scale, to=ir.DataType.FLOAT),
                                 op.Cast(zero_point, to=narrow(dtype, quant_min, quant_max)))

    def dq_per_tensor(input, scale, zero_point, quant_min: int, quant_max: int, dtype, out_dtype=None):
        return op.DequantizeLinear(input, op.Cast(scale, to=ir.DataType.FLOAT),
                                   op.Cast(zero_point, to=narrow(dtype, quant_min, quant_max)))

    def dq_group(input, scales, zero_points, quant_min: int, quant_max: int, dtype, group_size: int,
                 output_dtype=None):
        # Emitted as the [K, N] layout blocked along axis 0: what ONNX Runtime fuses (DQ + MatMul -> MatMulNBits)
        wt = op.Transpose(input, perm=[1, 0])
        st = op.Transpose(op.Cast(scales, to=ir.DataType.FLOAT), perm=[1, 0])
        return op.Transpose(op.DequantizeLinear(wt, st, axis=0, block_size=group_size), perm=[1, 0])

    return {QD.quantize_per_tensor.tensor: q_per_tensor, QD.dequantize_per_tensor.tensor: dq_per_tensor,
            QD.dequantize_per_channel_group.default: dq_group}


@contextlib.contextmanager
def _exact_no_op_rules():
    """Keep ``x + 1e-15`` in the exported graph. The exporter's optimizer (onnxscript) removes ``x + c`` and
    ``x - c`` as no-ops when ``c`` is within 1e-8 of 0: an epsilon such as Sana's linear attention
    ``num / (den + 1e-15)`` vanishes and ONNX Runtime divides 0 by 0 (NaN) where PyTorch gives 0. Those two
    rules are left out while diffpress exports (ONNX Runtime removes true no-ops itself); if onnxscript's
    internals differ from what this expects, nothing is changed."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _no_op

        saved = rewriter._DEFAULT_REWRITE_RULES
        no_op = {id(r) for r in _no_op.rules if any(f"= {op} (" in str(r._target_pattern) for op in ("Add", "Sub"))}
    except (ImportError, AttributeError, TypeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in no_op)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _strip_metadata(model) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces, module paths, class hierarchies):
    on small quantized models it outweighs the int8 weights."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def _drop_noop_squeezes(model) -> int:
    """Replace ``Squeeze`` nodes that squeeze an axis whose static size is not 1 with ``Identity``.

    ``torch.squeeze(x, dim)`` is a no-op when that dimension is not 1 (PixArt's attention-mask path squeezes
    a 64-token axis this way); ONNX's Squeeze rejects it at load time ("Dimension of input 1 must be 1").
    Returns how many nodes were replaced."""
    import onnx_ir as ir

    replaced = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Squeeze" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        axes_value, data = node.inputs[1], node.inputs[0]
        const = axes_value.const_value
        shape = data.shape
        if const is None or shape is None:
            continue
        axes = [int(a) for a in np.asarray(const.numpy()).reshape(-1)]
        dims = [shape[a] for a in axes]
        if not any(isinstance(d, int) and d != 1 for d in dims):
            continue
        if not all(isinstance(d, int) and d != 1 for d in dims):
            continue  # a mix of real and no-op squeezes: leave it for ONNX Runtime to report
        identity = ir.node("Identity", inputs=[data], name=f"{node.name}_noop")
        node.graph.insert_before(node, identity)
        ir.convenience.replace_all_uses_with(node.outputs[0], identity.outputs[0])
        if node.outputs[0] in model.graph.outputs:
            idx = list(model.graph.outputs).index(node.outputs[0])
            model.graph.outputs[idx] = identity.outputs[0]
            identity.outputs[0].name = node.outputs[0].name
        node.graph.remove(node, safe=True)
        replaced += 1
    return replaced


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
    so.log_severity_level = 3  # errors only: the optimizer's notes about hardware-specific graphs are not news
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(nbits_accuracy_level))
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        # large models: write the optimized graph's weights beside it (one protobuf cannot exceed 2 GB)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(optimized_path).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph / RuntimeException
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffpressError(f"ONNX Runtime {ort.__version__} cannot load {Path(path).name}: {first}. The exported graph "
                             "uses something this runtime rejects; try another opset (--opset / exports.N.opset) "
                             "or report it with the model's config") from exc


def supported_opsets() -> range:
    """The ONNX opsets ``export_onnx`` can target: 18 (the dynamo exporter's oldest) to onnxscript's newest.

    Read from onnxscript's opset files when they are where this onnxscript keeps them (recipes are checked
    without importing onnxscript, which takes seconds), else from the imported package.
    """
    import importlib.util
    import re

    spec = importlib.util.find_spec("onnxscript")
    if spec is None:
        raise DiffpressError("onnxscript is not installed; the ONNX exporter needs it: pip install onnxscript")
    found = [int(m.group(1)) for loc in (spec.submodule_search_locations or [])
             for p in Path(loc, "onnx_opset", "_impl").glob("opset*.py") if (m := re.fullmatch(r"opset(\d+)\.py", p.name))]
    if not found:
        import onnxscript.onnx_opset

        found = [int(n[len("opset"):]) for n in dir(onnxscript.onnx_opset) if n[len("opset"):].isdigit()]
    return range(18, max(found) + 1)


def check_opset(opset: int) -> None:
    """Raise :class:`DiffpressError` unless ``export_onnx`` can write ``opset`` (see :func:`supported_opsets`)."""
    if opset not in supported_opsets():
        raise DiffpressError(f"opset {opset} is not supported: torch.onnx's dynamo exporter needs >= 18 and this "
                             f"onnxscript knows up to {supported_opsets()[-1]} (default 21)")


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
    target: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Export ``denoiser`` to ``out_dir/model.onnx`` (one ``.onnx`` per graph of its export plan, its extra
    files, and ``io_spec.json``) and verify every graph in ONNX Runtime.

    ``rtol`` bounds the relative RMS difference between ONNX Runtime and PyTorch; by default it is the
    loosest tolerance the model's passes declare (1e-4 for a float model; 5e-2 with quantization: ONNX
    Runtime's integer kernels requantize in fixed point and may round a value one step differently from
    the float simulation). The check runs at the export batch and at another batch size.

    ``target`` names the CPUs the artifact must agree on (``any`` or ``vnni``, see
    :data:`diffpress.compress.quantize.TARGETS`): the int8 weights were rounded for one of them by the quantize
    pass, and an artifact quantized for ``vnni`` is refused for ``any``. ``io_spec.json`` states the target.

    >>> import diffpress, tempfile, pathlib
    >>> res = export_onnx(diffpress.load("digits-dit"), pathlib.Path(tempfile.mkdtemp()) / "dit")
    >>> res.verification["passed"], res.spec["inputs"][0]["name"]
    (True, 'sample')
    """
    import onnx

    check_opset(opset)
    plan = build_plan(denoiser, sample_shape)
    need, why = plan.min_opset
    if opset < need:
        raise DiffpressError(f"{why}, got {opset}")
    rtol = rtol if rtol is not None else plan.rtol
    # torch.export specializes a dimension of size 1, so a dynamic batch is traced at 2 or more
    trace_batch = max(batch, 2) if dynamic_batch else batch
    big = sum(p.numel() for p in denoiser.parameters()) > 100_000_000
    with atomic_dir(out_dir, force=force) as tmp:
        entries, facts, all_ops, all_ort_ops = [], {}, Counter(), Counter()
        for graph in plan.graphs:
            args = graph.example(trace_batch, 0)
            path = tmp / f"{graph.name}.onnx"
            program, max_batch = _export_graph(graph, args, opset, dynamic_batch, denoiser)
            _drop_noop_squeezes(program.model)
            _strip_metadata(program.model)
            for spec, record in registry.specs(denoiser.compression):
                if spec.onnx_rewrite is not None:
                    for key, value in spec.onnx_rewrite(program.model, record).items():
                        summed = isinstance(value, int) and not isinstance(value, bool)  # counts add up over graphs
                        facts[key] = facts.get(key, 0) + value if summed else value
            program.save(str(path), external_data=big)
            ops = _op_counts(onnx.load(str(path), load_external_data=False))
            all_ops.update(ops)
            with torch.no_grad(), eval_mode(denoiser):
                outputs = graph.outputs(args)
            entry = {"name": graph.name, "file": path.name, "description": graph.description,
                     "inputs": describe(list(args), graph.input_names, "batch" if dynamic_batch else trace_batch),
                     "outputs": describe(outputs, graph.output_names, "batch" if dynamic_batch else trace_batch),
                     "op_types": ops, "verification": {"passed": None, "note": "not verified (verify=False)"}}
            if max_batch is not None and max_batch < 1024:
                entry["max_batch"] = max_batch  # the model's own code bounds the batch (torch.export's guard)
            if verify:
                entry["verification"], ort_ops = _verify(graph, denoiser, path, tmp, batch, rtol, dynamic_batch,
                                                         facts.get("target"))
                entry["ort_op_types"] = ort_ops
                all_ort_ops.update(ort_ops)
            entries.append(entry)
        made_for = (facts.get("target") or {}).get("name")
        if target is not None and made_for not in (None, target, "any"):
            raise DiffpressError(f"target {target!r}: this model's int8 weights were quantized for target {made_for!r}, "
                                 f"which does not run correctly on {target!r} CPUs; quantize again with target "
                                 f"{target!r} (--set passes.N.target={target})")
        for name, alternatives in plan.required_ops:
            if not any(all_ops.get(op) for op in alternatives):
                raise DiffpressError(f"the model has pass {name!r}, whose artifact must contain "
                                     f"{' or '.join(alternatives)} nodes, but the exported graphs have none; "
                                     "its rewritten layers were lost in export")
        spec = write_io_spec(tmp, plan, runtime="onnxruntime", graphs=entries, rtol=rtol,
                             extra={"opset": opset, "dynamic_batch": dynamic_batch, **registry.io_spec_defaults(),
                                    **facts})
        result = ExportResult(Path(out_dir), spec, spec.get("verification", {}), dict(sorted(all_ops.items())),
                              dict(sorted(all_ort_ops.items())))
    return result


def _export_graph(graph: GraphSpec, args: tuple, opset: int, dynamic_batch: bool, denoiser: Denoiser):
    """torch.onnx.export of one graph. A model whose code bounds the batch (torch.export then suggests
    ``Dim('batch', max=N)``) is exported with that bound, which the artifact's io_spec states."""
    bound = 1024
    for _ in range(2):
        dynamic = _batch_dims(graph.module, args, torch.export.Dim("batch", min=1, max=bound)) if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with eval_mode(denoiser), denoiser.runtime.using(mode="export"):
                    program = torch.export.export(graph.module, args, dynamic_shapes=dynamic, strict=False)
            except Exception as exc:  # noqa: BLE001 - a batch bound to retry with, or one line
                suggested = re.search(r"Dim\('batch', max=(\d+)\)", str(exc))
                if dynamic_batch and suggested and int(suggested.group(1)) < bound:
                    bound = int(suggested.group(1))
                    continue
                raise DiffpressError(f"torch.export failed on graph {graph.name!r}: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
            try:
                with _exact_no_op_rules():
                    onnx_program = torch.onnx.export(
                        program, args, dynamo=True, opset_version=opset, input_names=graph.input_names,
                        output_names=graph.output_names, custom_translation_table=_translations(opset),
                        verbose=False)
            except Exception as exc:  # noqa: BLE001 - report the exporter's failure in one line
                raise DiffpressError(f"torch.onnx.export failed on graph {graph.name!r}: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return onnx_program, (bound if dynamic_batch else None)
    raise DiffpressError(f"torch.export failed on graph {graph.name!r}: no dynamic batch bound satisfies it; "
                         "export with dynamic_batch=False")


def _batch_dims(module: torch.nn.Module, args: tuple, batch) -> tuple:
    """``dynamic_shapes`` for ``module(*args)`` with a dynamic first dimension on every input, shaped like the
    forward's signature (torch.export wants a ``*cond`` parameter's inputs grouped in one tuple)."""
    out: list = []
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            rest = tuple({0: batch} for _ in args[len(out):])
            return (*out, rest) if rest else tuple(out)
        if len(out) < len(args):
            out.append({0: batch})
    return tuple(out)


def _verify(graph: GraphSpec, denoiser: Denoiser, path: Path, tmp: Path, batch: int, rtol: float,
            dynamic_batch: bool, target: dict | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    import onnx

    optimized = tmp / f"{path.stem}.ort-optimized.onnx"
    sess = ort_session(path, optimized_path=optimized)
    ort_ops = _op_counts(onnx.load(str(optimized), load_external_data=False))
    for extra in tmp.glob(f"{path.stem}.ort-optimized.onnx*"):
        extra.unlink()
    checks = []
    for b, seed in ((batch, 1), (batch + 1 if dynamic_batch else batch, 2)):
        args = graph.example(b, seed)
        with torch.no_grad(), eval_mode(denoiser):
            refs = [r.numpy() for r in graph.outputs(args)]
        try:
            gots = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DiffpressError(f"ONNX Runtime failed running {path.name} at batch {b}: {first}") from exc
        for name, ref, got in zip(graph.output_names, refs, gots):
            checks.append({"graph": graph.name, "output": name, "batch": b,
                           "max_abs_diff": float(np.abs(got - ref).max()), "rel_rms_diff": rel_rms(got, ref)})
    passed = all(c["rel_rms_diff"] <= rtol for c in checks)
    flags = cpu_flags()
    verification = {"runtime": "onnxruntime CPU", "rtol": rtol, "checks": checks, "passed": passed,
                    "cpu": {"machine": platform.machine(), "int8_flags": flags}}
    if not passed:
        worst = max(c["rel_rms_diff"] for c in checks)
        hint = ""
        if target and integer_kernels_agree(target.get("name"), flags) is False:
            hint = (f"; this artifact's target is {target['name']!r} (full-range int8 weights) and this CPU has "
                    f"{', '.join(flags) or 'no known int8 extension'} but no VNNI / AMX, where ONNX Runtime's integer "
                    "kernels saturate: quantize with target 'any' (--set passes.N.target=any) for this CPU")
        raise DiffpressError(f"ONNX Runtime disagrees with PyTorch on graph {graph.name!r}: relative RMS difference "
                             f"{worst:.3g} > rtol {rtol}{hint}")
    return verification, ort_ops
