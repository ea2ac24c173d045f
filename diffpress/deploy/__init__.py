"""Run an exported diffpress artifact's whole sampling loop in ONNX Runtime.

:class:`OrtDenoiser` loads an ONNX export folder (plain, quantized, pruned or cached: whatever its
``io_spec.json`` lists) and behaves like a :class:`~diffpress.Denoiser` for :func:`diffpress.sample`, so the
loop is the same code: the diffusers scheduler from the artifact's scheduler config (its arithmetic on CPU
tensors), classifier-free guidance in one doubled batch, per-sample seeds, batching. The network runs in
ONNX Runtime; a cached artifact runs the graph its ``cache_schedule.json`` names for each step and carries the
cache tensors from one graph to the next. Labels go through the exported ``conditioner`` graph when there is
one.

>>> import diffpress, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp()) / "dit"
>>> _ = diffpress.export_onnx(diffpress.load("digits-dit"), folder)
>>> out = sample(folder, labels=[1, 2], steps=4, guidance=3.0, progress=False)
>>> out.images.shape
torch.Size([2, 1, 16, 16])
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext


class OrtDenoiser(nn.Module):
    """An exported ONNX artifact behind the :class:`~diffpress.Denoiser` calling convention.

    ``threads``: ONNX Runtime intra-op threads (0: its default). ``timing`` accumulates the seconds spent in
    ONNX Runtime and the number of graph runs, so a caller can tell the network from the loop around it.
    """

    def __init__(self, folder: str | Path, threads: int = 0):
        super().__init__()
        from diffpress.exporters.onnx import ort_session

        self.folder = Path(folder)
        spec_path = self.folder / "io_spec.json"
        if not spec_path.is_file():
            raise DiffpressError(f"{self.folder} has no io_spec.json: it is not a diffpress export folder (make one with "
                                 "`diffpress export MODEL --format onnx --out DIR`)")
        spec = json.loads(spec_path.read_text())
        if spec.get("runtime") != "onnxruntime":
            raise DiffpressError(f"{self.folder} holds a {spec.get('runtime')!r} export; deploy runs ONNX exports "
                                 "(--format onnx)")
        self.spec = spec
        self.sessions = {g["name"]: ort_session(self.folder / g["file"], threads) for g in spec["graphs"]}
        self.graphs = {g["name"]: g for g in spec["graphs"]}
        main = self.graphs["model"]
        self.sample_shape = tuple(main["inputs"][0]["shape"][1:])
        cache_inputs = {i for g in spec["graphs"] for i in [x["name"] for x in g["inputs"]] if i.startswith("cache.")}
        self.cond_names = [i["name"] for i in main["inputs"][2:] if i["name"] not in cache_inputs]
        self.cond_dtypes = {i["name"]: i["dtype"] for i in main["inputs"][2:]}
        self.prediction_type = spec["prediction_type"]
        self.scheduler_config = spec.get("scheduler")
        self.null_label = spec.get("null_label")
        self.num_classes = spec.get("num_classes")
        self.adapter = SimpleNamespace(sampler=spec.get("auto_sampler"))  # what make_scheduler("auto") reads
        self.runtime = RunContext()
        self.conditioner = "conditioner" in self.sessions
        if not self.cond_names:
            self.cond_kind = "none"
        elif self.cond_dtypes[self.cond_names[0]] == "int64" and not self.conditioner:
            self.cond_kind = "class"
        else:
            self.cond_kind = "hidden_states"
        self.schedule = None
        if (self.folder / "cache_schedule.json").is_file():
            self.schedule = json.loads((self.folder / "cache_schedule.json").read_text())
        self._cache: dict[str, np.ndarray] = {}
        self._run: int | None = None
        self.timing = {"seconds": 0.0, "runs": 0}

    # -- what diffpress.sample reads -----------------------------------------------------------------------------
    @property
    def supports_guidance(self) -> bool:
        return self.null_label is not None or self.cond_kind == "hidden_states"

    @property
    def default_guidance(self) -> float:
        return 3.0 if self.supports_guidance and self.cond_kind != "none" else 1.0

    def encode_labels(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if self.conditioner:
            return torch.from_numpy(self._session("conditioner", {"class_labels": labels.numpy()})[0])
        if self.cond_kind == "class":
            return labels
        raise DiffpressError("this artifact takes conditioning states and has no conditioner graph; pass cond")

    def null_cond(self, batch: int, like: Any = None) -> Any:
        if self.null_label is not None:
            return self.encode_labels(torch.full((batch,), self.null_label, dtype=torch.long))
        if self.cond_kind != "hidden_states" or like is None:
            raise DiffpressError("this artifact has no null condition; sample with guidance=1")
        return {k: torch.zeros_like(v) for k, v in like.items()} if isinstance(like, dict) else torch.zeros_like(like)

    # -- one denoiser call ----------------------------------------------------------------------------------------
    def _session(self, name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        out = self.sessions[name].run(None, feed)
        self.timing["seconds"] += time.perf_counter() - start
        self.timing["runs"] += 1
        return out

    def _graph_for_step(self) -> str:
        ctx, sched = self.runtime, self.schedule
        if sched is None or ctx.step is None:
            return "model"
        if ctx.steps != sched["steps"]:
            raise DiffpressError(f"this artifact's cache schedule is for {sched['steps']} steps, but the sampler runs "
                                 f"{ctx.steps}; sample with steps={sched['steps']}")
        if ctx.runs != self._run:  # a new trajectory: nothing from the last one is reused
            self._cache, self._run = {}, ctx.runs
        return sched["graph_per_step"][ctx.step]

    def forward(self, x: torch.Tensor, t, cond: Any = None) -> torch.Tensor:
        name = self._graph_for_step()
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        feed = {"sample": x.float().numpy(), "timestep": np.ascontiguousarray(t.numpy())}
        parts = cond if isinstance(cond, dict) else ({self.cond_names[0]: cond} if self.cond_names else {})
        for key, value in parts.items():
            feed[key] = torch.as_tensor(value).numpy().astype(self.cond_dtypes[key], copy=False)
        graph = self.graphs[name]
        for i in graph["inputs"]:
            if i["name"].startswith("cache."):
                if i["name"] not in self._cache:
                    raise DiffpressError(f"graph {name!r} reads {i['name']}, which no earlier step of this run produced")
                feed[i["name"]] = self._cache[i["name"]]
        outs = self._session(name, feed)
        for o, value in zip(graph["outputs"][1:], outs[1:]):
            if self.schedule is not None and self.runtime.step is not None:
                self._cache[o["name"]] = value
        return torch.from_numpy(outs[0])


def sample(folder: str | Path | OrtDenoiser, *, threads: int = 0, **kwargs):
    """:func:`diffpress.sample` with the network in ONNX Runtime: ``folder`` is an ONNX export folder (or an
    :class:`OrtDenoiser`); the keywords are :func:`diffpress.sample`'s (labels / cond, guidance, steps,
    scheduler, seed, batch_size, progress)."""
    from diffpress.sampling import sample as run

    den = folder if isinstance(folder, OrtDenoiser) else OrtDenoiser(folder, threads)
    return run(den, **kwargs)


def loop_timer(folder: str | Path, *, steps: int, threads: int = 0, sampler: str | None = "auto",
               guidance: float | None = None, seed: int = 0):
    """A zero-argument callable that runs one whole sampling loop of the artifact in ``folder`` (one sample,
    class 0 or the artifact's example conditioning), for side-by-side timing; its ``denoiser.timing`` splits
    ONNX Runtime time from the loop's own."""
    den = OrtDenoiser(folder, threads)
    kw: dict[str, Any] = {}
    if den.cond_kind == "none":
        kw["num_samples"] = 1
    elif den.num_classes:
        kw["labels"] = [0]
    else:
        main = den.graphs["model"]["inputs"]
        g = torch.Generator().manual_seed(seed)
        kw["cond"] = {i["name"]: torch.randn(1, *i["shape"][1:], generator=g) if i["dtype"].startswith("float")
                      else torch.zeros(1, *i["shape"][1:], dtype=getattr(torch, i["dtype"]))
                      for i in main[2:] if i["name"] in den.cond_names}
        if len(kw["cond"]) == 1:
            kw["cond"] = next(iter(kw["cond"].values()))
    g = den.default_guidance if guidance is None else guidance

    def run():
        return sample(den, steps=steps, scheduler=sampler, guidance=g, seed=seed, progress=False, **kw)

    run.denoiser = den
    return run
