"""export_torchscript(): ``torch.jit.trace`` of a Denoiser, checked by reloading the file.

TorchScript is deprecated upstream (PyTorch recommends torch.export / ExecuTorch); diffpress keeps it
because deployments still ask for it, and warns. Quantized layers trace to their fake-quant ops, so the
artifact computes what the PyTorch simulation computes (integer speedups come from the ONNX path). They
are traced as plain round/clamp arithmetic so the file loads in any PyTorch without diffpress.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from diffpress._io import atomic_dir
from diffpress.compress.quant import plain_arithmetic
from diffpress.denoiser import Denoiser, eval_mode
from diffpress.exporters.onnx import _Exportable, example_feed, io_names

DEPRECATION = ("TorchScript is deprecated upstream (torch.jit.trace); diffpress still exports it, but prefer the "
               "ONNX export or torch.export for new deployments")


def export_torchscript(denoiser: Denoiser, out_dir: str | Path, *, batch: int = 2,
                       sample_shape: tuple[int, int, int] | None = None, rtol: float = 1e-5,
                       force: bool = False) -> dict[str, Any]:
    """Trace ``denoiser`` to ``out_dir/model.pt`` (+ ``io_spec.json``); reload it and compare outputs.

    The traced graph has a fixed batch size (``batch``); timestep is float32 ``(batch,)``.

    >>> import diffpress, tempfile, pathlib, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     spec = export_torchscript(diffpress.load("digits-dit"), pathlib.Path(tempfile.mkdtemp()) / "ts")
    >>> spec["verification"]["passed"]
    True
    """
    warnings.warn(DEPRECATION, FutureWarning, stacklevel=2)
    args = example_feed(denoiser, batch, sample_shape)
    names = io_names(denoiser)
    with atomic_dir(out_dir, force=force) as tmp:
        with warnings.catch_warnings(), torch.no_grad(), eval_mode(denoiser), plain_arithmetic():
            warnings.simplefilter("ignore")  # tracer warnings on shape-dependent Python code in diffusers
            traced = torch.jit.trace(_Exportable(denoiser), args, check_trace=False)
            traced.save(str(tmp / "model.pt"))
            reloaded = torch.jit.load(str(tmp / "model.pt"))
            check = example_feed(denoiser, batch, sample_shape, seed=3)
            ref, got = denoiser(*check), reloaded(*check)
        rel = float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12))
        spec = {
            "format": "diffpress.io_spec/1",
            "runtime": "torch.jit (TorchScript, deprecated upstream)",
            "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
                       for n, a in zip(names, args)],
            "outputs": [{"name": "out_sample", "shape": [batch, *denoiser.sample_shape], "dtype": "float32"}],
            "timestep": "float32 (batch,), the scheduler's timestep value",
            "prediction_type": denoiser.prediction_type,
            "null_label": denoiser.null_label,
            "verification": {"rel_rms_diff": rel, "rtol": rtol, "passed": rel <= rtol},
        }
        (tmp / "io_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        if rel > rtol:
            from diffpress.errors import DiffpressError

            raise DiffpressError(f"the reloaded TorchScript module disagrees with PyTorch: rel RMS {rel:.3g} > {rtol}")
    return spec
