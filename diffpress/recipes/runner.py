"""run_recipe(): load, calibrate, compress, evaluate, export, and write one output folder atomically.

The output folder (written to a temporary sibling and renamed into place only when everything
succeeded, so an error or Ctrl-C leaves nothing behind) holds ``model/`` (reloadable with
:func:`diffpress.load`), ``recipe.yaml`` (the resolved recipe), one folder per export with its
``io_spec.json``, ``report.json``, ``report.md`` and ``grid.png``.
"""
from __future__ import annotations

import json

import contextlib
import dataclasses
import hashlib
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

import diffpress.conditions as conditions
import diffpress.distributed as distributed
from diffpress._io import atomic_dir, check_writable
from diffpress.calibration import CalibrationSet, collect
from diffpress.compress import registry
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.eval import Report, evaluate
from diffpress.eval.cost import latency_side_by_side
from diffpress.recipes import run_report
from diffpress.recipes.schema import (
    CalibrationConfig,
    EvaluationConfig,
    Recipe,
    dump_recipe,
    load_recipe,
)
from diffpress.schedulers import auto_sampler, make_scheduler


@dataclass
class RunResult:
    """What :func:`run_recipe` produced: the compressed denoiser, the measurements and where they went."""

    recipe: Recipe
    model: Denoiser  # the compressed denoiser
    reference: Denoiser  # the uncompressed one it was measured against
    evaluation: Report
    pass_reports: list[Any]
    report: dict[str, Any]  # what report.json holds
    calibration: CalibrationSet | None = None  # lazy when streamed to a file (a resume file is deleted at the end)
    out: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def summary(self) -> str:
        return run_report.summary(self.report, self.out)


class _Stages:
    """One progress bar over the stages of a run (each stage's own bar sits below it) and their timings."""

    def __init__(self, names: list[str], progress: bool):
        self.names, self.progress = names, progress
        self.timings: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc="diffpress run", unit="stage", disable=not progress, file=sys.stderr)

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        self.bar.set_description(name)
        if self.progress:
            self.bar.write(f"[{len(self.timings) + 1}/{len(self.names)}] {name}{': ' + detail if detail else ''}",
                           file=sys.stderr)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self.bar.update(1)


def resolve_sampler(denoiser: Denoiser, name: str | None) -> tuple[str | None, dict[str, str | None]]:
    """A recipe's sampler value -> the ``scheduler`` argument of sample/collect, and what it means for this model.

    >>> from diffpress import load
    >>> resolve_sampler(load("digits-unet"), "auto")  # the zoo ships its DDPM training schedule
    ('ddim', {'requested': 'auto', 'class': 'DDIMScheduler', 'from': 'recipe'})
    >>> resolve_sampler(load("digits-unet"), "model")[1]["class"]
    'DDPMScheduler'
    """
    if name == "auto":
        # a DDPM schedule is what a model was trained with; sampling it in 50 steps is poor, so DDIM instead
        arg = auto_sampler(denoiser)
    else:
        arg = None if name in (None, "model") else name
    cls = type(make_scheduler(denoiser, arg)).__name__
    return arg, {"requested": name, "class": cls, "from": "checkpoint" if arg is None else "recipe"}


def model_fingerprint(denoiser: Denoiser) -> str:
    """A hash of the denoiser's state (names, shapes, values): tells calibration sets of different models apart."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in denoiser.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _calibration_settings(den: Denoiser, cfg: CalibrationConfig, sampler: str | None) -> dict[str, Any]:
    """The part of a calibration set's metadata that must match the recipe for the set to be reused."""
    return {"num_samples": cfg.samples, "steps": cfg.steps, "scheduler": sampler or "model default",
            "guidance": den.default_guidance if cfg.guidance is None else cfg.guidance, "seed": cfg.seed,
            "policy": dataclasses.asdict(cfg.policy), "conditions": dataclasses.asdict(cfg.conditions)}


def _check_reuse(cs: CalibrationSet, den: Denoiser, settings: dict[str, Any], fingerprint: str, path: Path) -> None:
    meta = cs.meta
    cond_shape = conditions.shapes(cs.cond)
    want_cond = None if den.cond_kind == "none" else den.cond_shape
    got = (tuple(meta.get("sample_shape", ())), meta.get("cond_kind"), cond_shape)
    if got != (tuple(den.sample_shape), den.cond_kind, want_cond):
        raise DiffpressError(
            f"calibration set {path} does not fit this model: it holds samples {got[0]}, condition {got[1]} "
            f"{got[2] or ''}; the model takes {tuple(den.sample_shape)}, {den.cond_kind} {want_cond or ''}. "
            "Give another --calibration path (a new set is collected there)")
    if meta.get("model_fingerprint") not in (None, fingerprint):
        raise DiffpressError(f"calibration set {path} was collected on another model (the weights differ); "
                             "give another --calibration path (a new set is collected there)")
    diff = [f"{k}={meta.get(k)!r} (recipe: {v!r})" for k, v in settings.items() if meta.get(k) != v]
    if diff:
        raise DiffpressError(f"calibration set {path} was collected with other settings: {', '.join(diff)}; give "
                             "another --calibration path, or make the recipe match (--set calibration.KEY=VALUE)")


def resume_file(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its calibration set until it completes, so that the same command run
    again after an interruption or an error reuses it instead of collecting it anew.

    >>> resume_file("runs/w8a8").as_posix()
    'runs/.w8a8.calibration.safetensors'
    """
    out = Path(out)
    return out.parent / f".{out.name}.calibration.safetensors"


def _calibrate(den: Denoiser, cfg: CalibrationConfig, sampler: str | None, path: Path | None,
               progress: bool, resume: bool = False) -> tuple[CalibrationSet, str]:
    """Collect the calibration set, or reuse the one at ``path``. A user's file must fit the model and the
    recipe; a ``resume`` file (an interrupted run's) that does not is collected anew."""
    settings = _calibration_settings(den, cfg, sampler)
    fingerprint = model_fingerprint(den)
    if path is not None and path.exists():
        try:
            cs = CalibrationSet.load(path)
            _check_reuse(cs, den, settings, fingerprint, path)
            return cs, (f"resumed: reused {path}, collected by an interrupted run of the same command" if resume
                        else f"loaded from {path}")
        except DiffpressError:
            if not resume:
                raise
            path.unlink()
    conds, _ = conditions.materialize(den, cfg.conditions, cfg.samples, seed=cfg.seed)
    conds.pop("num_samples", None)
    # with a path the set streams there chunk by chunk (memory holds one chunk: SD-sized models) and is read back
    # lazily; it is on disk as soon as it is complete, so a later failure of the run does not cost the collection
    cs = collect(den, num_samples=cfg.samples, steps=cfg.steps, scheduler=sampler, guidance=cfg.guidance,
                 policy=cfg.policy, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress, path=path,
                 meta={"model_fingerprint": fingerprint, "conditions": dataclasses.asdict(cfg.conditions)}, **conds)
    return cs, "collected" if path is None else f"collected, saved to {path}"


def _export(fmt: str, compressed: Denoiser, folder: Path, cfg) -> dict[str, Any]:
    from diffpress.exporters import export_onnx, export_torchscript

    if fmt == "onnx":
        res = export_onnx(compressed, folder, opset=cfg.opset, batch=cfg.batch, dynamic_batch=cfg.dynamic_batch,
                          target=cfg.target, rtol=cfg.rtol)
        return {"format": fmt, "path": f"{folder.name}/model.onnx", "bytes": run_report.folder_bytes(folder),
                "opset": cfg.opset, "verification": res.verification, "op_types": res.op_types,
                "ort_op_types": res.ort_op_types}
    if fmt == "executorch":
        from diffpress.exporters.executorch import export_executorch

        spec = export_executorch(compressed, folder, batch=cfg.batch, rtol=cfg.rtol)
        return {"format": fmt, "path": f"{folder.name}/model.pte", "bytes": run_report.folder_bytes(folder),
                "verification": spec["verification"], "methods": spec["methods"],
                "delegation": {m: {k: v for k, v in d.items() if k != "ops"} for m, d in spec["delegation"].items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation is stated in the report instead
        spec = export_torchscript(compressed, folder, batch=cfg.batch)
    return {"format": fmt, "path": f"{folder.name}/model.pt", "bytes": run_report.folder_bytes(folder),
            "verification": spec["verification"],
            "note": "TorchScript is deprecated upstream (its successor on mobile: {format: executorch}); the traced "
                    "graph computes what the PyTorch model computes"
                    + "".join(f" ({n})" for n in registry.simulation_notes(compressed.compression))}


def ort_speed(reference: Denoiser, compressed_onnx: Path, work: Path, ev: EvaluationConfig, opset: int,
              batch: int | None = None, sampler: str | None = "auto") -> dict:
    """ONNX Runtime latency of ``compressed_onnx`` against an fp32 ONNX export of ``reference``, side by side,
    at ``batch`` (default ``ev.ort_batch``; a static-batch export runs at its own batch only). A cached artifact
    is timed over its whole sampling loop (:mod:`diffpress.deploy`, batch 1, ``sampler``), not per call."""
    batch = ev.ort_batch if batch is None else batch
    import onnxruntime

    from diffpress.exporters import export_onnx
    from diffpress.exporters.onnx import example_feed, ort_session

    export_onnx(reference, work / "fp32-onnx", opset=opset)
    paths = {"fp32": work / "fp32-onnx" / "model.onnx", "compressed": compressed_onnx}
    schedule = compressed_onnx.parent / "cache_schedule.json"
    if schedule.is_file():  # a cached artifact: only the whole sampling loop says what it saves
        from diffpress.deploy import loop_timer

        steps = json.loads(schedule.read_text())["steps"]
        calls = {k: loop_timer(p.parent, steps=steps, threads=ev.ort_threads, sampler=sampler, guidance=ev.guidance)
                 for k, p in paths.items()}
        med = latency_side_by_side(calls, repeats=max(3, ev.ort_repeats // 10), warmup=1)
        return {"runtime": f"onnxruntime {onnxruntime.__version__} CPU", "threads": ev.ort_threads or "all cores",
                "batch": 1, "repeats": max(3, ev.ort_repeats // 10), "unit": f"sampling run ({steps} steps)",
                "fp32_ms": med["fp32"] * 1e3, "compressed_ms": med["compressed"] * 1e3,
                "speedup": med["fp32"] / med["compressed"], "fp32_onnx_bytes": run_report.folder_bytes(work / "fp32-onnx")}
    feeds = example_feed(reference, batch, seed=5)
    calls = {}
    for key, path in paths.items():
        sess = ort_session(path, threads=ev.ort_threads)
        inputs = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feeds)}
        calls[key] = (lambda s=sess, f=inputs: s.run(None, f))
    med = latency_side_by_side(calls, repeats=ev.ort_repeats, warmup=3)
    return {"runtime": f"onnxruntime {onnxruntime.__version__} CPU", "threads": ev.ort_threads or "all cores",
            "batch": batch, "repeats": ev.ort_repeats, "fp32_ms": med["fp32"] * 1e3,
            "compressed_ms": med["compressed"] * 1e3, "speedup": med["fp32"] / med["compressed"],
            "fp32_onnx_bytes": run_report.folder_bytes(work / "fp32-onnx")}


def _check_reload(compressed: Denoiser, folder: Path) -> dict[str, Any]:
    """Reload the saved model and require bit-identical outputs: the folder is the run's model, not an approximation."""
    from diffpress.loading import load

    reloaded = load(folder)
    diffs = []
    with torch.no_grad():
        for t in (999, 500, 1):
            x, _, c = compressed.example_inputs(2, seed=t)
            a, b = compressed(x, torch.full((2,), t), c), reloaded(x, torch.full((2,), t), c)
            diffs.append(float((a - b).abs().max()))
            if not torch.equal(a, b):
                raise DiffpressError(f"the saved model does not reproduce the compressed one (max |diff| "
                                     f"{diffs[-1]:.3g} at t={t}); a pass's save/restore is broken: please report this")
    return {"identical": True, "timesteps": [999, 500, 1], "max_abs_diff": max(diffs)}


def _model_label(model: str | Path | Denoiser | None) -> str:
    from diffpress.zoo import DEFAULT_MODEL

    if isinstance(model, Denoiser):
        return f"{type(model.model).__name__} object"
    return str(model if model is not None else DEFAULT_MODEL)


def default_out(recipe_name: str, model: str | Path | None) -> Path:
    """``diffpress-out/<recipe>-<model>`` in the current folder (the model's zoo name or folder name)."""
    from diffpress.zoo import DEFAULT_MODEL

    # the recipe's name can come from a user's YAML: keep it to one plain path component
    label = re.sub(r"[^A-Za-z0-9._-]", "_", f"{recipe_name}-{Path(str(model or DEFAULT_MODEL)).name}").lstrip(".")
    return Path("diffpress-out") / (label or "run")


def run_recipe(recipe: str | Path | Recipe, model: str | Path | Denoiser | None = None, out: str | Path | None = None,
               overrides: Iterable[str] = (), calibration: str | Path | None = None, force: bool = False,
               progress: bool = True) -> RunResult | None:
    """Run a recipe end to end: load ``model`` (default: the zoo's digits-cond-unet), calibrate, apply the
    passes, evaluate against the uncompressed model on the same seeds, export, and write ``out`` atomically.

    ``recipe`` is a built-in name (``diffpress recipes``), a YAML file or a :class:`Recipe`; ``overrides``
    are ``KEY=VALUE`` strings like the CLI's ``--set``. ``calibration`` names a calibration file: reused
    if it exists (it must fit the model and the recipe), else collected and saved there. With
    ``out=None`` nothing is written: exports and timings use a temporary folder.

    Under ``torchrun`` (after :func:`diffpress.distributed.init`; ``diffpress run`` does it) every rank takes its
    share of the calibration trajectories and observer batches and applies the passes to the same statistics;
    rank 0 alone evaluates, exports and writes (bit-identical to a single-process run), the others return None.

    >>> import diffpress
    >>> tiny = ["calibration.samples=2", "calibration.steps=4", "calibration.policy.count=2",
    ...         "evaluation.samples=4", "evaluation.steps=4", "evaluation.latency_repeats=1",
    ...         "evaluation.metrics=[psnr, ssim]", "exports=[]"]
    >>> res = diffpress.run_recipe("fast", "digits-dit", overrides=tiny, progress=False)
    >>> res["passes"][0]["pass"], res["evaluation"]["settings"]["num_samples"]
    ('quantize', 4)
    >>> res["evaluation"]["fidelity"]["psnr_db"] > 20  # against the uncompressed model, same seeds
    True
    """
    recipe = load_recipe(recipe, overrides)
    if out is not None:
        check_writable(out, force)  # before any work
    cal_path = Path(calibration) if calibration is not None else None
    if cal_path is not None and not cal_path.exists():
        check_writable(cal_path, force=False)  # where the set will be saved must take it, before any work
    resume = cal_path is None and out is not None and recipe.needs_calibration
    if resume:
        cal_path = resume_file(out)
    ev = recipe.evaluation
    onnx_cfg = next((e for e in recipe.exports if e.format == "onnx"), None)
    measure_ort = "ort_speed" in ev.metrics and onnx_cfg is not None
    names = ["load", *(["calibrate"] if recipe.needs_calibration else []),
             *[f"pass {i}: {p.name}" for i, p in enumerate(recipe.passes)], "evaluate",
             *[f"export {e.format}" for e in recipe.exports], *(["ort speed"] if measure_ort else []),
             *(["write"] if out is not None else [])]
    main = distributed.is_main()  # under torchrun: every rank calibrates and compresses, rank 0 does the rest
    progress = progress and main  # one set of progress bars
    stages = _Stages(names, progress)
    try:
        result = _run(recipe, model, out, force, progress, cal_path, resume, stages, onnx_cfg, measure_ort)
    except BaseException:
        if resume and cal_path.exists():
            print(f"diffpress: the calibration set is kept at {cal_path}; the same command reuses it "
                  "(delete it to collect anew)", file=sys.stderr)
        raise
    if resume and main:
        cal_path.unlink(missing_ok=True)  # the run is complete: nothing to resume
    return result


def _check_ranks_agree(model: Denoiser, where: str) -> None:
    """Under torchrun every rank must hold the same model after each pass (the next pass merges statistics
    from all of them); a difference is a defect of a pass, reported here rather than written."""
    if not distributed.active():
        return
    prints = distributed.gather(model_fingerprint(model))
    if len(set(prints)) > 1:
        raise DiffpressError(f"under torchrun the processes hold different models after {where}; this is a bug in "
                             "that pass's distributed handling: run it as one process and report it")


def _run(recipe: Recipe, model, out, force: bool, progress: bool, cal_path: Path | None, resume: bool,
         stages: _Stages, onnx_cfg, measure_ort: bool) -> RunResult:
    ev = recipe.evaluation
    main = distributed.is_main()
    folder = (atomic_dir(out, force=force) if out is not None and main
              else tempfile.TemporaryDirectory(prefix="diffpress-run-"))
    with folder as tmp, stages.bar:
        tmp = Path(tmp)
        label = _model_label(model)
        with stages("load", label):
            from diffpress.loading import load
            from diffpress.zoo import DEFAULT_MODEL

            reference = model if isinstance(model, Denoiser) else load(model if model is not None else DEFAULT_MODEL)
            if out is not None:
                reference.check_savable()  # before any work: a run that cannot write its model finds out now
            for source in (recipe.calibration.conditions, ev.conditions):
                if source.kind == "file":
                    conditions.load_file(reference, source.path, 1)  # a bad embeddings file fails before any work
        cal_sampler, cal_sched = resolve_sampler(reference, recipe.calibration.sampler)
        cs, cal_source = None, "not needed: no pass uses calibration data"
        if recipe.needs_calibration:
            c = recipe.calibration
            with stages("calibrate", f"{c.samples} trajectories x {c.steps} steps ({cal_sched['class']})"):
                cs, cal_source = _calibrate(reference, c, cal_sampler, cal_path, progress, resume)
        compressed = reference.copy()
        pass_reports = []
        for i, step in enumerate(recipe.passes):
            with stages(f"pass {i}: {step.name}", step.spec.description):
                pass_reports.append(step.spec.apply(compressed, step.config, cs, progress))
            _check_ranks_agree(compressed, f"pass {i} ({step.name})")
        if not main:  # the other ranks' share is done: rank 0 evaluates, exports and writes
            return None
        eval_sampler, eval_sched = resolve_sampler(reference, ev.sampler)
        with stages("evaluate", f"{ev.samples} samples x {ev.steps} steps, both models, seeds {ev.seed}.."):
            eval_conds, cond_note = conditions.materialize(reference, ev.conditions, ev.samples, seed=ev.seed)
            evaluation = evaluate(reference, compressed, num_samples=ev.samples, steps=ev.steps,
                                  scheduler=eval_sampler, guidance=ev.guidance, seed=ev.seed,
                                  latency_repeats=ev.latency_repeats, names=(label, f"{label} [{recipe.name}]"),
                                  cond=eval_conds.get("cond"), uncond=eval_conds.get("uncond"), progress=progress)
            if cond_note:
                evaluation.notes.append(cond_note)
            if not evaluation["fidelity"]["candidate_finite"]:
                raise DiffpressError("the compressed model's samples contain NaN or inf: it diverged, so there is "
                                     "no result to write; try a milder recipe (e.g. int8 weights, more calibration)")
            simulated = registry.simulation_notes(compressed.compression)
            if simulated:
                evaluation.notes.append(run_report.simulation_note(simulated))
        exports = []
        for e in recipe.exports:
            with stages(f"export {e.format}"):
                exports.append(_export(e.format, compressed, tmp / e.format, e))
        speed = None
        if measure_ort:
            with stages("ort speed", f"fp32 ONNX vs {recipe.name} ONNX, {ev.ort_repeats} interleaved repeats"), \
                    tempfile.TemporaryDirectory(prefix="diffpress-fp32-") as work:
                speed = ort_speed(reference, tmp / "onnx" / "model.onnx", Path(work), ev, onnx_cfg.opset,
                                  batch=None if onnx_cfg.dynamic_batch else onnx_cfg.batch, sampler=eval_sampler)
        def report(reload_check: dict | None = None) -> dict[str, Any]:
            return run_report.build(
                recipe=recipe, model=label, reference=reference, compressed=compressed, calibration=cs,
                calibration_source=cal_source, calibration_scheduler=cal_sched, pass_reports=pass_reports,
                evaluation=evaluation, evaluation_scheduler=eval_sched, exports=exports, speed=speed,
                reload_check=reload_check, timings=stages.timings)

        if out is None:
            data = report()
        else:
            with stages("write", str(out)):
                compressed.save_pretrained(tmp / "model")
                data = report(_check_reload(compressed, tmp / "model"))
                (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
                run_report.write(data, evaluation, tmp)
    return RunResult(recipe, compressed, reference, evaluation, pass_reports, data, cs,
                     Path(out) if out is not None else None)
