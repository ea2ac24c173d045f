"""The report of a recipe run: ``report.json`` (every figure measured in the run), ``report.md`` and the summary."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from diffpress.calibration import CalibrationSet
from diffpress.compress import registry
from diffpress.denoiser import Denoiser
from diffpress.eval import Report
from diffpress.recipes.schema import Recipe
from diffpress.recipes.validate import to_data

FORMAT = "diffpress.run_report/1"
def simulation_note(notes: list[str]) -> str:
    """The report's note for a compressed model whose passes are simulated in PyTorch (``notes``: what each
    pass simulates, from the registry)."""
    return ("quality figures and PyTorch latencies of the compressed model come from a simulation in PyTorch ("
            + "; ".join(notes) + "); deployed speed is the ONNX Runtime figure, and the export check bounds how far "
            "the deployed artifact differs from the simulation")
_INTEGER_KERNELS = ("QLinear", "Integer", "NBits", "QGemm")


def folder_bytes(folder: Path) -> int:
    """Bytes of the model files of an export folder (``model.*``, external data included)."""
    return sum(p.stat().st_size for p in Path(folder).glob("model.*") if p.is_file())


def _pass_data(step, report: Any) -> dict[str, Any]:
    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else {}
    data.pop("config", None)  # already under "config"
    return {"pass": step.name, "config": to_data(step.config), "summary": step.spec.summary(report), **data}


def _headline(metrics: list[str], ev: dict[str, Any], size: dict[str, Any], speed: dict | None,
              simulated: bool) -> dict[str, Any]:
    ref, cand = ev["models"]["reference"], ev["models"]["candidate"]
    both = {k: {"uncompressed": ref.get(k), "compressed": cand.get(k)} for k in ("cond_accuracy", "fd_real")}
    figures = {
        "psnr": ev["fidelity"]["psnr_db"], "ssim": ev["fidelity"]["ssim"], **both,
        "size": {k: size[k] for k in ("reference_bytes", "compressed_bytes", "ratio")},
        "torch_latency": {"uncompressed_ms": ref["latency_ms_per_call"], "compressed_ms": cand["latency_ms_per_call"],
                          "note": "PyTorch eager, batch 1" + ("; the compressed model is a simulation" if simulated
                                                              else "")},
        "ort_speed": None if speed is None else {k: speed[k] for k in ("fp32_ms", "compressed_ms", "speedup")},
    }
    return {m: figures[m] for m in metrics}


def build(*, recipe: Recipe, model: str, reference: Denoiser, compressed: Denoiser, calibration: CalibrationSet | None,
          calibration_source: str, calibration_scheduler: dict, pass_reports: list[Any], evaluation: Report,
          evaluation_scheduler: dict, exports: list[dict], speed: dict | None, reload_check: dict | None,
          timings: dict[str, float]) -> dict[str, Any]:
    """Everything ``report.json`` holds; each figure was measured in this run."""
    from diffpress._version import __version__

    ev = evaluation.data
    ref, cand = ev["models"]["reference"], ev["models"]["candidate"]
    simulated = registry.simulation_notes(compressed.compression)
    size: dict[str, Any] = {"reference_bytes": ref["bytes"], "compressed_bytes": cand["bytes"],
                            "ratio": ref["bytes"] / cand["bytes"],
                            "measure": "state dict serialized as safetensors (what save_pretrained writes)"}
    onnx = next((e for e in exports if e["format"] == "onnx"), None)
    if speed is not None and onnx is not None:
        speed = dict(speed, integer_kernels={k: v for k, v in onnx["ort_op_types"].items()
                                             if any(s in k for s in _INTEGER_KERNELS)})
        size.update(onnx_fp32_bytes=speed["fp32_onnx_bytes"], onnx_bytes=onnx["bytes"],
                    onnx_ratio=speed["fp32_onnx_bytes"] / onnx["bytes"])
    cal: dict[str, Any] = {"source": calibration_source, "scheduler": calibration_scheduler}
    if calibration is not None:
        cal.update(inputs=len(calibration), timesteps=calibration.timesteps, meta=calibration.meta)
    return {
        "format": FORMAT,
        "diffpress_version": __version__,
        "recipe": {"name": recipe.name, "description": recipe.description},
        "model": {"source": model, "architecture": type(reference.model).__name__, "kind": reference.kind,
                  "sample_shape": list(reference.sample_shape), "conditioning": reference.cond_kind,
                  "compression": [r["pass"] for r in compressed.compression]},
        "headline": _headline(recipe.evaluation.metrics, ev, size, speed, bool(simulated)),
        # what the PyTorch model of the passes only simulates (e.g. integer arithmetic as fake quantization)
        "compression_simulated": bool(simulated),
        "simulated": simulated,
        "calibration": cal,
        "passes": [_pass_data(step, rep) for step, rep in zip(recipe.passes, pass_reports)],
        "evaluation": {**ev, "scheduler": evaluation_scheduler},
        "size": size,
        "speed": speed,
        "exports": exports,
        "reload_check": reload_check,
        "timings_s": timings,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _num(v: Any, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def headline_lines(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) pairs for the figures the recipe's ``evaluation.metrics`` asks for."""
    h, ev = data["headline"], data["evaluation"]
    s = ev["settings"]
    lines = []
    if "psnr" in h or "ssim" in h:
        psnr = "identical samples" if ev["fidelity"]["identical_samples"] else f"PSNR {ev['fidelity']['psnr_db']:.2f} dB"
        fid = ", ".join(([psnr] if "psnr" in h else []) + ([f"SSIM {ev['fidelity']['ssim']:.4f}"] if "ssim" in h else []))
        sim = "simulated in PyTorch, " if data.get("compression_simulated") else ""
        lines.append(("fidelity", f"{fid} against the uncompressed model ({sim}{s['num_samples']} samples, seeds "
                                 f"{s['seed']}..{s['seed'] + s['num_samples'] - 1}, {ev['scheduler']['class']} "
                                 f"{s['steps']} steps, guidance {s['guidance']})"))
    dist = [f"{title} {_num(h[k]['compressed'], fmt)} (uncompressed {_num(h[k]['uncompressed'], fmt)})"
            for k, title, fmt in (("cond_accuracy", "conditional accuracy", ".3f"), ("fd_real", "FD to real data", ".1f"))
            if k in h]
    if dist:
        lines.append(("quality", ", ".join(dist)))
    if "size" in h:
        z = data["size"]
        text = f"{_mb(z['reference_bytes'])} -> {_mb(z['compressed_bytes'])} ({z['ratio']:.2f}x smaller, state dict)"
        if "onnx_bytes" in z:
            text += f"; ONNX {_mb(z['onnx_fp32_bytes'])} -> {_mb(z['onnx_bytes'])} ({z['onnx_ratio']:.2f}x)"
        lines.append(("size", text))
    if h.get("ort_speed"):
        sp = data["speed"]
        threads = sp["threads"] if isinstance(sp["threads"], str) else f"{sp['threads']} thread" + "s" * (sp["threads"] > 1)
        lines.append(("speed", f"ONNX Runtime CPU, batch {sp['batch']}, {threads}: fp32 "
                               f"{sp['fp32_ms']:.3f} ms -> {sp['compressed_ms']:.3f} ms per {sp.get('unit', 'call')} "
                               f"({sp['speedup']:.2f}x, median of {sp['repeats']})"))
    if "torch_latency" in h:
        t = h["torch_latency"]
        sim = "simulation, " if data.get("compression_simulated") else ""
        lines.append(("eager", f"PyTorch {t['uncompressed_ms']:.3f} ms -> {t['compressed_ms']:.3f} ms per call "
                               f"({sim}not deployed speed)"))
    floats = sum(len(p.get("skipped", [])) for p in data["passes"])
    lines.append(("float", f"{floats} layers left in float (report.md lists them with the reason)"))
    return lines


def summary(data: dict[str, Any], out: Path | None = None) -> str:
    """The few lines the CLI prints at the end of a run."""
    lines = [f"{data['recipe']['name']} on {data['model']['source']}: {', '.join(p['pass'] for p in data['passes'])}"]
    lines += [f"  {label:<8} {text}" for label, text in headline_lines(data)]
    if out is not None:
        parts = ["model/", "recipe.yaml", *[e["format"] + "/" for e in data["exports"]], "report.json", "report.md",
                 "grid.png"]
        lines.append(f"wrote {out}: {' '.join(parts)}")
    return "\n".join(lines)


def to_markdown(data: dict[str, Any], evaluation: Report) -> str:
    """``report.md``: the headline, speed and size, what each pass did (layers left in float and why), details."""
    lines = [f"# diffpress run: {data['recipe']['name']} on `{data['model']['source']}`", "",
             data["recipe"]["description"], "", "## Summary", ""]
    lines += [f"- **{label}**: {text}" for label, text in headline_lines(data)]
    sp = data["speed"]
    if sp:
        lines += ["", "## Speed in ONNX Runtime", "",
                  f"fp32 ONNX export of the uncompressed model against the compressed export, timed side by side "
                  f"in this run ({sp['runtime']}, batch {sp['batch']}, threads: {sp['threads']}, median of "
                  f"{sp['repeats']} interleaved repeats).", "",
                  f"| model | ms per {sp.get('unit', 'call')} | bytes |", "|---|---|---|",
                  f"| fp32 | {sp['fp32_ms']:.3f} | {sp['fp32_onnx_bytes']:,} |",
                  f"| compressed | {sp['compressed_ms']:.3f} | {data['size'].get('onnx_bytes', 0):,} |", "",
                  f"Speedup {sp['speedup']:.2f}x. Integer kernels after ONNX Runtime's optimisation: "
                  + (", ".join(f"{k} x{v}" for k, v in sp["integer_kernels"].items()) or "none")]
    for p in data["passes"]:
        lines += ["", f"## Pass: {p['pass']}", ""]
        lines += [f"    {ln}" for ln in p["summary"].splitlines() if not ln.strip().startswith("float:")]
        if p.get("skipped"):
            lines += ["", "| layer left in float | reason |", "|---|---|"]
            lines += [f"| `{s['name']}` | {s['reason']} |" for s in p["skipped"]]
    cal = data["calibration"]
    lines += ["", "## Calibration", "", f"- {cal['source']}; sampler {cal['scheduler']['class']} "
                                        f"(recipe: {cal['scheduler']['requested']})"]
    if "inputs" in cal:
        lines.append(f"- {cal['inputs']} denoiser inputs at timesteps {', '.join(f'{t:g}' for t in cal['timesteps'])}")
    if data["exports"]:
        lines += ["", "## Exports", "", "| format | file | bytes | check against PyTorch |", "|---|---|---|---|"]
        for e in data["exports"]:
            v = e["verification"]
            worst = max((c["rel_rms_diff"] for c in v.get("checks", [])), default=v.get("rel_rms_diff"))
            lines.append(f"| {e['format']} | `{e['path']}` | {e['bytes']:,} | rel. RMS diff {_num(worst, '.2g')} "
                         f"(limit {v['rtol']:g}) |")
    if data["reload_check"]:
        lines += ["", "`model/` reloaded with `diffpress.load` gives bit-identical outputs (checked at t = "
                  + ", ".join(map(str, data["reload_check"]["timesteps"])) + ")."]
    # the evaluation's own report, one heading level down
    lines += ["", *("#" + ln if ln.startswith("#") else ln for ln in evaluation.to_markdown().splitlines())]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v:g}" for k, v in data["timings_s"].items()), ""]
    return "\n".join(lines)


def write(data: dict[str, Any], evaluation: Report, folder: Path) -> None:
    """``report.json``, ``report.md`` and ``grid.png`` into ``folder``."""
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (folder / "report.md").write_text(to_markdown(data, evaluation))
    evaluation.save_grid(folder / "grid.png")

