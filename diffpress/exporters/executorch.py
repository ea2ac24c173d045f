"""export_executorch(): ExecuTorch programs (``.pte``, XNNPACK backend) for phones and edge devices, verified in
the ExecuTorch runtime; load_executorch(): a Denoiser that runs the program, for sampling through it.

ExecuTorch is the successor of TorchScript on mobile. The export traces every graph of the export plan with
``torch.export`` in run-time mode ``literal``: diffpress's own scales become Python numbers in the graph
(static int8 per tensor: 8-bit activations are stored as int8, uint8 shifted by 128, the same numbers),
int8 per-channel weights get an explicit zero point and linears run as ``F.linear``. That is the pattern the
XNNPACK partitioner lowers to its integer kernels, so nothing is calibrated a second time. Layers XNNPACK
cannot run in integer (4-bit or grouped weights, dynamic 4-bit activations) are exported as the same
fake-quant arithmetic in float (what TorchScript carries); ops XNNPACK does not take (GroupNorm,
upsampling) run in ExecuTorch's portable kernels. ``io_spec.json`` lists what was delegated, op by op.

Timestep groups: a ``.pte`` method has constant scales, so a model with K timestep groups becomes K methods
of one program (``model_t0`` .. ``model_t{K-1}``, the bounds in ``io_spec.json``); the caller picks the
method by timestep, as :func:`load_executorch` does. Constant data shared by the methods is stored once.

Needs the optional extra ``executorch`` (``pip install "diffpress[executorch]"``).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import diffpress.conditions as conditions
from diffpress._io import atomic_dir
from diffpress.compress.quant import ActQuant, literal_scales
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.errors import DiffpressError
from diffpress.exporters.plan import build_plan, describe, rel_rms, verification, write_io_spec

RUNTIME = "executorch (XNNPACK backend, portable kernels for the rest)"
INSTALL = 'pip install "diffpress[executorch]"  (executorch; it keeps the installed torch)'


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ExecuTorch's import and lowering print torchao load failures, pytree and tracer notes: not the user's."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def _require() -> dict[str, Any]:
    """The ExecuTorch entry points, or an error that says how to install them."""
    try:
        with _quiet():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.devtools.backend_debug import get_delegation_info
            from executorch.exir import to_edge_transform_and_lower
            from executorch.runtime import Runtime
    except ImportError as exc:
        raise DiffpressError(f"ExecuTorch export needs the optional extra 'executorch' ({exc}); install it: "
                             f"{INSTALL}") from exc
    return {"partitioner": XnnpackPartitioner, "lower": to_edge_transform_and_lower,
            "delegation": get_delegation_info, "runtime": Runtime}


def require_installed() -> None:
    """Fail early, without importing it (seconds), when the ExecuTorch extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise DiffpressError(f"ExecuTorch export needs the optional extra 'executorch'; install it: {INSTALL}")


def available() -> bool:
    """Whether ExecuTorch is installed (the optional extra)."""
    try:
        _require()
    except DiffpressError:
        return False
    return True


def set_threads(n: int) -> None:
    """Size of the ExecuTorch runtime's thread pool (XNNPACK's kernels); ``1`` for single-thread timing."""
    with _quiet():
        from executorch.extension.pybindings import _C

    _C._unsafe_reset_threadpool(int(n))


def timestep_bounds(denoiser: Denoiser) -> list[float]:
    """The bounds of the model's timestep groups (``[]``: one group). Every grouped quantizer of a model is cut at
    the same timesteps (the calibration's); a model whose quantizers disagree cannot be split into methods."""
    found = {tuple(m.bounds.tolist()) for m in denoiser.modules() if isinstance(m, ActQuant) and m.groups > 1}
    if len(found) > 1:
        raise DiffpressError(f"the timestep groups of this model's quantizers have different bounds ({sorted(found)}); "
                             "an ExecuTorch program needs one set: quantize with one timestep_groups setting")
    return list(next(iter(found))) if found else []


def _group_timestep(bounds: list[float], g: int, top: float = 1000.0) -> float:
    """A timestep inside group ``g`` (its middle)."""
    edges = [0.0, *bounds, top]
    return (edges[g] + edges[g + 1]) / 2


def _integer_layers(graph_module: torch.fx.GraphModule) -> Counter:
    """Linears / convolutions inside XNNPACK subgraphs by input kind: ``int8`` (int8 per-tensor activation and
    int8 per-channel weight: XNNPACK's integer kernels) or ``float``."""
    kinds: Counter = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "get_attr" or not node.target.startswith("lowered_module"):
            continue
        inner = getattr(graph_module, node.target).original_module.graph_module.graph
        for n in inner.nodes:
            name = str(n.target)
            if n.op != "call_function" or not ("linear" in name or "convolution" in name):
                continue
            x, w = n.args[0], n.args[1]
            int8 = ("dequantize_per_tensor" in str(getattr(x, "target", ""))
                    and "dequantize_per_channel" in str(getattr(w, "target", "")))
            kinds["int8" if int8 else "float"] += 1
    return kinds


def _delegation(info, graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    ops = {str(k): {"delegated": v.delegated, "not_delegated": v.non_delegated}
           for k, v in sorted(info.delegation_by_operator.items())}
    layers = _integer_layers(graph_module)
    return {"subgraphs": info.num_delegated_subgraphs, "delegated_nodes": info.num_delegated_nodes,
            "not_delegated_nodes": info.num_non_delegated_nodes,
            "int8_layers": layers["int8"], "float_layers_delegated": layers["float"],
            "layers_not_delegated": sum(v["not_delegated"] for k, v in ops.items()
                                        if "linear" in k or "convolution" in k or k.endswith("_mm_default")),
            "not_delegated_ops": sorted(k for k, v in ops.items() if v["not_delegated"]), "ops": ops}


def export_executorch(denoiser: Denoiser, out_dir: str | Path, *, batch: int = 2,
                      sample_shape: tuple[int, int, int] | None = None, rtol: float | None = None,
                      force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Lower ``denoiser`` to ``out_dir/model.pte`` (XNNPACK backend; one method per graph of its export plan and
    timestep group), write ``io_spec.json`` (inputs, methods, delegation op counts, verification) and check every
    method in the ExecuTorch runtime against the PyTorch model.

    Inputs as in the ONNX export (``sample``, ``timestep`` float32 ``(batch,)``, then the conditioning parts),
    with a fixed batch size ``batch``. ``rtol`` defaults to the tolerance the model's passes declare.

    >>> import tempfile, pathlib
    >>> class Toy(nn.Module):  # any (x, t, cond) module; a zoo model or a diffusers UNet lowers in minutes
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(1, 1, 3, padding=1)
    ...     def forward(self, x, t, cond=None):
    ...         return self.conv(x) * (t.view(-1, 1, 1, 1) / 1000)
    >>> den = Denoiser(Toy(), sample_shape=(1, 8, 8), prediction_type="epsilon")
    >>> spec = export_executorch(den, pathlib.Path(tempfile.mkdtemp()) / "et")
    >>> spec["verification"]["passed"], spec["methods"], spec["delegation"]["model"]["float_layers_delegated"]
    (True, ['model'], 1)
    """
    et = _require()
    plan = build_plan(denoiser, sample_shape)
    rtol = plan.rtol if rtol is None else rtol
    bounds = timestep_bounds(denoiser)
    groups = len(bounds) + 1
    methods = [(graph, g, graph.name if groups == 1 else f"{graph.name}_t{g}")
               for graph in plan.graphs for g in range(groups)]
    t0 = time.perf_counter()
    exported = {}
    with _quiet(), torch.no_grad(), eval_mode(denoiser), literal_scales(denoiser):
        for graph, g, name in methods:
            with denoiser.runtime.using(mode="literal", group=g):
                exported[name] = torch.export.export(graph.module, graph.example(batch, 0), strict=False)
        edge = et["lower"](exported, partitioner=[et["partitioner"]()])
        delegation = {name: _delegation(et["delegation"](gm), gm)
                      for name in exported for gm in [edge.exported_program(name).graph_module]}
        program = edge.to_executorch()
    lower_s = time.perf_counter() - t0
    with atomic_dir(out_dir, force=force) as tmp:
        path = tmp / "model.pte"
        path.write_bytes(program.buffer)
        with _quiet():
            loaded = et["runtime"].get().load_program(path)
        entries = []
        for graph in plan.graphs:
            checks, mine = [], [m for m in methods if m[0] is graph]
            for _, g, name in mine:
                inputs = list(graph.example(batch, 3))
                if groups > 1:
                    ti = graph.input_names.index("timestep")
                    inputs[ti] = torch.full_like(inputs[ti], _group_timestep(bounds, g))
                with torch.no_grad(), eval_mode(denoiser):
                    refs = graph.outputs(tuple(inputs))
                gots = loaded.load_method(name).execute(inputs)
                checks += [{"graph": graph.name, "method": name, "output": n, "batch": batch,
                            "rel_rms_diff": rel_rms(got, ref)} for n, ref, got in zip(graph.output_names, refs, gots)]
            per_method = ", ".join(f"{c['method']} {c['rel_rms_diff']:.3g}" for c in checks)
            entries.append({"name": graph.name, "file": path.name, "description": graph.description,
                            "methods": [m[2] for m in mine],
                            "inputs": describe(inputs, graph.input_names, batch),
                            "outputs": describe(refs, graph.output_names, batch),
                            "verification": verification(checks, rtol, f"the ExecuTorch program's graph {graph.name!r}",
                                                         f" (per method: {per_method})")})
        extra = {"methods": [m[2] for m in methods], "batch": batch,
                 "timestep_groups": {"bounds": bounds, "methods": {m[2]: m[1] for m in methods},
                                     "rule": "method g serves bounds[g-1] <= t < bounds[g]"},
                 "delegation": delegation, "bytes": path.stat().st_size, "lowering_seconds": round(lower_s, 1)}
        return write_io_spec(tmp, plan, runtime=RUNTIME, graphs=entries, extra=extra, rtol=rtol)


class ExecuTorchModel(nn.Module):
    """Runs an exported program: ``(sample, timestep, cond) -> prediction`` in the calling convention of a plain
    module, splitting a batch into the program's fixed batch size (padding the last piece) and picking the
    timestep group's method."""

    def __init__(self, folder: str | Path, cond_names: list[str]):
        super().__init__()
        folder = Path(folder)
        spec_path = folder / "io_spec.json"
        if not spec_path.is_file() or not (folder / "model.pte").is_file():
            raise DiffpressError(f"{folder} is not an ExecuTorch export (no io_spec.json / model.pte); make one with "
                                 "diffpress export --format executorch")
        self.spec = json.loads(spec_path.read_text())
        self.batch = int(self.spec["batch"])
        self.bounds = torch.tensor(self.spec["timestep_groups"]["bounds"], dtype=torch.float32)
        self.cond_names = cond_names
        et = _require()
        with _quiet():
            self.program = et["runtime"].get().load_program(folder / "model.pte")
        self.methods = [self.program.load_method(m) for m in self.spec["methods"] if m.startswith("model")]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t = t.reshape(-1).float().expand(len(x))
        method = self.methods[int((t[:1, None] >= self.bounds).sum())] if len(self.bounds) else self.methods[0]
        parts = conditions.tensors(cond) if len(self.cond_names) > 1 else ([] if cond is None else [cond])
        out = []
        for lo in range(0, len(x), self.batch):
            hi = min(lo + self.batch, len(x))
            feed = [v[lo:hi] for v in (x, t, *parts)]
            if hi - lo < self.batch:  # pad with the piece's last item, drop its outputs
                feed = [torch.cat([v, v[-1:].expand(self.batch - len(v), *v.shape[1:])]) for v in feed]
            out.append(method.execute([v.contiguous() for v in feed])[0][: hi - lo])
        return torch.cat(out)


def load_executorch(folder: str | Path, like: Denoiser) -> Denoiser:
    """A :class:`~diffpress.Denoiser` whose calls run the ExecuTorch program in ``folder``, so ``diffpress.sample``
    samples through it. ``like`` is the model it was exported from (or one loaded from the same checkpoint): it
    gives the conditioning (label conditioner, class count), the prediction type and the sampler.

    >>> import diffpress, tempfile, pathlib
    >>> class Toy(nn.Module):  # any (x, t, cond) module; a zoo model or a diffusers UNet lowers in minutes
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(1, 1, 3, padding=1)
    ...     def forward(self, x, t, cond=None):
    ...         return self.conv(x) * (t.view(-1, 1, 1, 1) / 1000)
    >>> den = Denoiser(Toy(), sample_shape=(1, 8, 8), prediction_type="epsilon", scheduler_config={
    ...     "_class_name": "DDIMScheduler", "num_train_timesteps": 1000})
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "et"
    >>> _ = export_executorch(den, folder, batch=2)
    >>> pte = load_executorch(folder, like=den)  # runs the .pte: 3 samples -> program calls of batch 2
    >>> a = diffpress.sample(pte, num_samples=3, steps=4, progress=False).images
    >>> b = diffpress.sample(den, num_samples=3, steps=4, progress=False).images
    >>> a.shape, bool(torch.allclose(a, b, atol=1e-4))
    (torch.Size([3, 1, 8, 8]), True)
    """
    model = ExecuTorchModel(folder, like.cond_names)
    kw: dict[str, Any] = {}
    if like.conditioner is not None:
        kw = {"conditioner": like.conditioner, "cond_shape": like.cond_shape}
    elif like.cond_kind == "class":
        kw = {"cond_kind": "class", "num_classes": like.num_classes}
    elif like.cond_kind == "hidden_states":
        kw = {"cond_kind": "hidden_states",
              "cond_shape": {k: p for k, p in like.parts.items()} if len(like.parts) > 1 else like.cond_shape}
    return Denoiser(model, prediction_type=like.prediction_type, sample_shape=like.sample_shape,
                    scheduler_config=like.scheduler_config, **kw)
