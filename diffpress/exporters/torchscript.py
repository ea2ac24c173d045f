"""export_torchscript(): ``torch.jit.trace`` of every graph of a Denoiser's export plan, checked by reloading.

TorchScript is deprecated upstream (PyTorch recommends torch.export / ExecuTorch); diffpress keeps it
because deployments still ask for it, and warns, naming the ExecuTorch path (:mod:`diffpress.exporters.executorch`). Modules that passes install run in the run-time
context's ``plain`` mode while tracing (fake quantization as round/clamp arithmetic), so the file loads in
any PyTorch without diffpress and computes what the PyTorch model computes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from diffpress._io import atomic_dir
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.exporters.plan import build_plan, describe, rel_rms, verification, write_io_spec

DEPRECATION = ("TorchScript is deprecated upstream (torch.jit.trace) and its mobile runtime is retired; diffpress "
               "still exports it, but for phones and edge devices use ExecuTorch (diffpress export --format executorch, "
               "diffpress.exporters.executorch.export_executorch), and ONNX elsewhere")


def export_torchscript(denoiser: Denoiser, out_dir: str | Path, *, batch: int = 2,
                       sample_shape: tuple[int, int, int] | None = None, rtol: float = 1e-5,
                       force: bool = False) -> dict[str, Any]:
    """Trace ``denoiser`` to ``out_dir/model.pt`` (one ``.pt`` per graph of its export plan, its extra files,
    ``io_spec.json``); reload each file and compare its outputs with PyTorch's.

    The traced graphs have a fixed batch size (``batch``); timestep is float32 ``(batch,)``.

    >>> import diffpress, tempfile, pathlib, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     spec = export_torchscript(diffpress.load("digits-dit"), pathlib.Path(tempfile.mkdtemp()) / "ts")
    >>> spec["verification"]["passed"]
    True
    """
    warnings.warn(DEPRECATION, FutureWarning, stacklevel=2)
    plan = build_plan(denoiser, sample_shape)
    with atomic_dir(out_dir, force=force) as tmp:
        entries = []
        for graph in plan.graphs:
            args = graph.example(batch, 0)
            path = tmp / f"{graph.name}.pt"
            with warnings.catch_warnings(), torch.no_grad(), eval_mode(denoiser), \
                    denoiser.runtime.using(mode="plain"):
                warnings.simplefilter("ignore")  # tracer warnings on shape-dependent Python code in diffusers
                traced = torch.jit.trace(graph.module, args, check_trace=False)
                traced.save(str(path))
                reloaded = torch.jit.load(str(path))
                check = graph.example(batch, 3)
                refs, gots = graph.outputs(check), reloaded(*check)
            gots = list(gots) if isinstance(gots, (tuple, list)) else [gots]
            checks = [{"graph": graph.name, "output": n, "batch": batch, "rel_rms_diff": rel_rms(g, r)}
                      for n, r, g in zip(graph.output_names, refs, gots)]
            entries.append({"name": graph.name, "file": path.name, "description": graph.description,
                            "inputs": describe(list(args), graph.input_names, batch),
                            "outputs": describe(refs, graph.output_names, batch),
                            "verification": verification(checks, rtol,
                                                         f"the reloaded TorchScript graph {graph.name!r}")})
        return write_io_spec(tmp, plan, runtime="torch.jit (TorchScript, deprecated upstream)", graphs=entries,
                             rtol=rtol)
