"""An export plan: the graphs and files an artifact holds, which the passes of a model contribute to.

Most models export one graph (``model``: ``sample, timestep[, cond] -> out_sample``). A pass can add
graphs (a cached model: a full-step graph that also emits its cache tensors and a cached-step graph that
takes them) and files (the cache schedule) through its registry entry's ``export_plan`` hook. The plan
also carries what every exporter must check, gathered from the registry: the tolerance the artifact is
verified at, the ONNX op types it must contain and what the PyTorch model only simulates. Every exporter
writes ``io_spec.json`` through :func:`write_io_spec`.

>>> import diffpress
>>> p = build_plan(diffpress.load("digits-dit"))
>>> [g.name for g in p.graphs], p.graphs[0].input_names, p.rtol
(['model'], ['sample', 'timestep', 'class_labels'], 0.0001)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import diffpress.conditions as conditions
from diffpress.compress import registry
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.schedulers import auto_sampler

SPEC_FORMAT = "diffpress.io_spec/1"
TIMESTEP_NOTE = ("float32 (batch,): the scheduler's timestep value (0 .. num_train_timesteps-1; sigma * 1000 for "
                 "flow-matching models), as the scheduler gives it (the model's own scaling is inside the graph); "
                 "all items of a batch share one timestep when the model has timestep-dependent modules (grouped "
                 "quantizer scales)")


class DenoiserGraph(nn.Module):
    """Positional inputs for export: sample, timestep, then one input per conditioning part (its name:
    ``class_labels``, ``encoder_hidden_states``, ``pooled_projections`` ...)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, sample, timestep, *cond):
        names = self.denoiser.cond_names
        if len(names) > 1:
            return self.denoiser(sample, timestep, dict(zip(names, cond)))
        return self.denoiser(sample, timestep, cond[0] if cond else None)


def io_names(denoiser: Denoiser) -> list[str]:
    return ["sample", "timestep", *denoiser.cond_names]


def example_feed(denoiser: Denoiser, batch: int, sample_shape=None, seed: int = 0) -> tuple:
    """Inputs in the exported convention: timestep float32 (batch,), then the conditioning parts in order."""
    x, t, cond = denoiser.example_inputs(batch, sample_shape, seed)
    t = torch.linspace(999.0, 1.0, batch) if batch > 1 else torch.tensor([499.0])
    return (x, t, *conditions.tensors(cond))


@dataclass
class GraphSpec:
    """One graph of an artifact: ``module(*inputs)`` returns one tensor or a tuple (one per output name);
    ``example(batch, seed)`` makes inputs; every input and output has the batch as its first dimension."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: Callable[[int, int], tuple]
    description: str = ""

    def outputs(self, inputs: tuple) -> list[torch.Tensor]:
        out = self.module(*inputs)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(out) != len(self.output_names):
            raise DiffpressError(f"export graph {self.name!r} returned {len(out)} outputs for names {self.output_names}")
        return out


@dataclass
class ExportPlan:
    """What an artifact of ``denoiser`` holds and how it is checked (see the module docstring)."""

    denoiser: Denoiser
    graphs: list[GraphSpec]
    files: dict[str, str] = field(default_factory=dict)  # extra files written beside the graphs: name -> text
    rtol: float = registry.FLOAT_RTOL
    required_ops: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (pass, any of these op types)
    simulated: list[str] = field(default_factory=list)
    min_opset: tuple[int, str] = (0, "")

    def add_graph(self, graph: GraphSpec) -> None:
        if any(g.name == graph.name for g in self.graphs):
            raise DiffpressError(f"the export plan already has a graph named {graph.name!r}")
        self.graphs.append(graph)

    def add_file(self, name: str, text: str) -> None:
        if name in self.files or name == "io_spec.json" or Path(name).name != name:
            raise DiffpressError(f"cannot add file {name!r} to the export plan (taken, reserved or not a plain name)")
        self.files[name] = text


def build_plan(denoiser: Denoiser, sample_shape: tuple[int, int, int] | None = None) -> ExportPlan:
    """The plan for ``denoiser``: its main graph, then whatever its passes add, with their checks."""
    main = GraphSpec("model", DenoiserGraph(denoiser), io_names(denoiser), ["out_sample"],
                     lambda batch, seed: example_feed(denoiser, batch, sample_shape, seed),
                     "one denoiser call: the model's prediction for (x_t, t, cond)")
    records = denoiser.compression
    plan = ExportPlan(denoiser, [main], rtol=registry.export_rtol(records),
                      required_ops=[(s.name, ops) for s, r in registry.specs(records)
                                    if (ops := s.onnx_ops(r) if callable(s.onnx_ops) else s.onnx_ops)],
                      simulated=registry.simulation_notes(records), min_opset=registry.min_opset(records))
    for spec, record in registry.specs(records):
        if spec.export_plan is not None:
            spec.export_plan(plan, denoiser, record)
    if denoiser.conditioner is not None:  # labels -> the states the model reads, so an artifact runs from labels
        plan.add_graph(GraphSpec(
            "conditioner", denoiser.conditioner, ["class_labels"], list(denoiser.cond_names),
            lambda batch, seed: (torch.randint(0, denoiser.num_classes, (batch,),
                                               generator=torch.Generator().manual_seed(seed)),),
            "class labels (the null label for guidance) -> the conditioning the model graphs read"))
    return plan


def describe(values: list[torch.Tensor], names: list[str], batch_dim: str | int) -> list[dict[str, Any]]:
    """``io_spec`` entries for tensors: name, shape (the batch as ``batch_dim``), dtype."""
    return [{"name": n, "shape": [batch_dim, *map(int, v.shape[1:])], "dtype": str(v.dtype).replace("torch.", "")}
            for n, v in zip(names, values)]


def write_io_spec(folder: Path, plan: ExportPlan, *, runtime: str, graphs: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None, rtol: float | None = None) -> dict[str, Any]:
    """Write ``folder/io_spec.json`` for any format and return it.

    ``graphs`` holds one entry per exported graph (``name``, ``file``, ``inputs``, ``outputs``,
    ``verification``); the first is the main graph, whose inputs and outputs are repeated at the top level.
    """
    den = plan.denoiser
    main = graphs[0]
    spec = {
        "format": SPEC_FORMAT,
        "runtime": runtime,
        **{k: main[k] for k in ("inputs", "outputs")},
        "timestep": TIMESTEP_NOTE,
        "prediction_type": den.prediction_type,
        "null_label": den.null_label,
        "num_classes": den.num_classes,
        "scheduler": den.scheduler_config,
        "auto_sampler": auto_sampler(den),
        "passes": [r["pass"] for r in den.compression],
        "simulated_in_pytorch": plan.simulated,
        **(extra or {}),
        "graphs": graphs,
        "files": sorted(plan.files),
    }
    checks = [c for g in graphs for c in g["verification"].get("checks", [])]
    if checks:
        spec["verification"] = {"runtime": runtime, "rtol": plan.rtol if rtol is None else rtol, "checks": checks,
                                "rel_rms_diff": max(c["rel_rms_diff"] for c in checks),
                                "passed": all(g["verification"]["passed"] for g in graphs)}
    for name, text in plan.files.items():
        (folder / name).write_text(text)
    (folder / "io_spec.json").write_text(json.dumps(spec, indent=2, default=str) + "\n")
    return spec


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS difference of ``got`` against ``ref``."""
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    return float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12))


def verification(checks: list[dict[str, Any]], rtol: float, what: str, detail: str = "") -> dict[str, Any]:
    """The ``verification`` entry of one exported graph from its ``checks`` (each with ``rel_rms_diff``) at
    ``rtol``; a difference over it is an error that names ``what`` (and ``detail``).

    >>> verification([{"rel_rms_diff": 1e-6}], 1e-5, "graph 'model'")["passed"]
    True
    """
    worst = max(c["rel_rms_diff"] for c in checks)
    if worst > rtol:
        raise DiffpressError(f"{what} disagrees with PyTorch: rel RMS {worst:.3g} > {rtol}{detail}")
    return {"rel_rms_diff": worst, "rtol": rtol, "passed": True, "checks": checks}
