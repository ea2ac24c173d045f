"""evaluate(): a candidate denoiser against its reference, same sampler and seeds; JSON, markdown and a PNG grid."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import diffpress.conditions as conditions
from diffpress._version import __version__
from diffpress._io import atomic_dir
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.eval import cost, metrics
from diffpress.eval.grid import difference, save_grid
from diffpress.sampling import sample

GRID_COLUMNS = 10


@dataclass
class Report:
    """Figures measured by :func:`evaluate`: ``data`` is what ``report.json`` holds."""

    data: dict[str, Any]
    reference_images: torch.Tensor
    candidate_images: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_markdown(self) -> str:
        d = self.data
        ref, cand = d["models"]["reference"], d["models"]["candidate"]
        s = d["settings"]

        def fmt(v: Any, unit: str = "") -> str:
            if v is None:
                return "n/a"
            if isinstance(v, float):
                return f"{v:.4g}{unit}"
            if isinstance(v, int):
                return f"{v:,}{unit}"
            return str(v)

        psnr = d["fidelity"]["psnr_db"]
        lines = [
            "# diffpress evaluation",
            "",
            f"Reference `{ref['name']}` vs candidate `{cand['name']}`: {s['num_samples']} samples, "
            f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']}, seeds {s['seed']}..{s['seed'] + s['num_samples'] - 1}.",
            "",
            "## Fidelity to the reference (same seeds)",
            "",
            f"- PSNR: {'inf (identical samples)' if psnr is None else f'{psnr:.2f} dB'}",
            f"- SSIM: {d['fidelity']['ssim']:.4f}",
            f"- max |difference|: {d['fidelity']['max_abs_diff']:.4g}",
            "",
            "## Models",
            "",
            "| metric | reference | candidate | candidate / reference |",
            "|---|---|---|---|",
        ]
        rows = [
            ("parameters", "params", ""), ("bytes on disk", "bytes", ""),
            ("MACs per call (batch 1)", "macs_per_call", ""), ("MACs per sample (full run)", "macs_per_sample", ""),
            ("latency per call, batch 1 (ms)", "latency_ms_per_call", ""),
            ("latency per sample run (s)", "latency_s_per_run", ""),
            ("FD to real digits", "fd_real", ""), ("conditional accuracy", "cond_accuracy", ""),
        ]
        for title, key, unit in rows:
            r, c = ref.get(key), cand.get(key)
            ratio = f"{c / r:.3f}" if isinstance(r, (int, float)) and isinstance(c, (int, float)) and r else ""
            lines.append(f"| {title} | {fmt(r, unit)} | {fmt(c, unit)} | {ratio} |")
        lines += ["", "Latencies are medians of interleaved repeats on this machine (PyTorch eager)."]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "Grid (`grid.png`): rows are reference, candidate, |difference| x4.", ""]
        return "\n".join(lines)

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write ``report.json``, ``report.md`` and ``grid.png`` into ``out_dir`` atomically."""
        with atomic_dir(out_dir, force=force) as tmp:
            self.write_into(tmp)
        return Path(out_dir)

    def write_into(self, folder: Path) -> None:
        """Write the report files into an existing folder (used inside a larger atomic output)."""
        (folder / "report.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (folder / "report.md").write_text(self.to_markdown())
        self.save_grid(folder / "grid.png")

    def save_grid(self, path: Path) -> Path:
        """The sample grid: rows reference, candidate, |difference| x4 (the first ``GRID_COLUMNS`` seeds)."""
        k = min(GRID_COLUMNS, len(self.reference_images))
        ref, cand = self.reference_images[:k], self.candidate_images[:k]
        return save_grid([("reference", ref), ("candidate", cand), ("|diff| x4", difference(ref, cand))], path)


def _conditions(den: Denoiser, n: int, seed: int, cond, notes: list[str]) -> dict[str, Any]:
    if den.cond_kind == "none":
        return {"num_samples": n}
    if cond is not None:
        if conditions.batch_size(cond) < n:
            raise DiffpressError(f"{conditions.batch_size(cond)} conditions for {n} evaluation samples; give at "
                                 "least one per sample")
        return {"cond": conditions.take(cond, slice(0, n))}
    if den.num_classes is not None:
        return {"labels": torch.arange(n) % den.num_classes}
    notes.append("conditioned on random normal hidden states (no text encoder given): fidelity between the two "
                 "models is meaningful, the images are not prompts' images")
    return {"cond": den.example_cond(n, seed)}


def _digits_metrics(images: torch.Tensor, labels: torch.Tensor | None, classifier, real_feats) -> dict[str, Any]:
    feats, logits = metrics.classifier_outputs(classifier, images)
    out: dict[str, Any] = {"fd_real": metrics.frechet_distance(feats.numpy(), real_feats)}
    if labels is not None:
        out["cond_accuracy"] = metrics.conditional_accuracy(logits, labels)
    return out


def evaluate(
    reference: Denoiser,
    candidate: Denoiser,
    *,
    num_samples: int = 500,
    steps: int = 50,
    scheduler: str | None = "auto",
    guidance: float | None = None,
    seed: int = 0,
    latency_repeats: int = 10,
    names: tuple[str, str] = ("reference", "candidate"),
    cond: Any = None,
    uncond: Any = None,
    progress: bool = True,
) -> Report:
    """Sample both denoisers with identical settings and seeds and measure what the candidate costs.

    Fidelity: PSNR / SSIM of the candidate's final samples against the reference's. On 16x16
    single-channel models (the digits zoo) also the Fréchet distance to real digits in the digits
    classifier's feature space and, with class labels, conditional accuracy. Cost: parameters,
    bytes, MACs per call and per sample, latency per call and per sampling run. ``cond``: the conditions
    to sample with (one per sample; ``uncond``, the guidance null for each); by default class labels
    ``0, 1, ...``, or random hidden states.

    >>> import diffpress
    >>> den = diffpress.load("digits-unet")
    >>> rep = evaluate(den, den, num_samples=8, steps=5, latency_repeats=2, progress=False)
    >>> rep["fidelity"]["psnr_db"] is None  # identical models: infinite PSNR
    True
    """
    guidance = reference.default_guidance if guidance is None else guidance
    notes: list[str] = []
    conds = _conditions(reference, num_samples, seed, cond, notes)
    if uncond is not None:
        conds["uncond"] = conditions.take(uncond, slice(0, num_samples))
    kw = dict(guidance=guidance, steps=steps, scheduler=scheduler, seed=seed, progress=progress, **conds)
    ref_out = sample(reference, **kw)
    cand_out = sample(candidate, **kw)
    ref_img, cand_img = ref_out.images, cand_out.images
    candidate_finite = bool(torch.isfinite(cand_img).all())
    if not candidate_finite:
        notes.append("candidate samples contain NaN/inf: the candidate diverged; fidelity figures are not meaningful")
        cand_img = torch.nan_to_num(cand_img, nan=0.0, posinf=1.0, neginf=-1.0)
    psnr = metrics.psnr(ref_img, cand_img)
    fidelity = {
        "psnr_db": None if math.isinf(psnr) else psnr,
        "identical_samples": math.isinf(psnr),
        "candidate_finite": candidate_finite,  # False: NaN/inf samples, replaced to compute the figures
        "ssim": metrics.ssim(ref_img, cand_img),
        "max_abs_diff": float((ref_img - cand_img).abs().max()),
    }

    models: dict[str, dict[str, Any]] = {}
    x1, t1, c1 = reference.example_inputs(1)
    one = {"num_samples": 1} if reference.cond_kind == "none" else {k: conditions.take(v, slice(0, 1)) for k, v in conds.items()}
    run_kw = {k: v for k, v in kw.items() if k not in ("num_samples", "labels", "cond", "uncond")}
    run_kw.update(one, progress=False)
    lat_call = cost.latency_side_by_side(
        {"reference": lambda: reference(x1, t1, c1), "candidate": lambda: candidate(x1, t1, c1)},
        repeats=latency_repeats)
    lat_run = cost.latency_side_by_side(
        {"reference": lambda: sample(reference, **run_kw), "candidate": lambda: sample(candidate, **run_kw)},
        repeats=max(1, latency_repeats // 4), warmup=1)
    digits = reference.sample_shape == (1, 16, 16)
    if digits:
        from diffpress.zoo import load_classifier
        from diffpress.zoo.data import load_digits

        classifier = load_classifier()
        real_feats, _ = metrics.classifier_outputs(classifier, load_digits("all")[0])
        real_feats = real_feats.numpy()
    else:
        notes.append("FD and conditional accuracy need a classifier for the data; diffpress ships one for "
                     "16x16 digits only, so they are not reported for this model")
    labels = ref_out.labels if reference.num_classes == 10 else None
    for key, den, out, name in (("reference", reference, ref_out, names[0]), ("candidate", candidate, cand_out, names[1])):
        macs = cost.macs_per_call(den)
        m: dict[str, Any] = {
            "name": name,
            "params": cost.parameter_count(den),
            "bytes": cost.bytes_on_disk(den),
            "macs_per_call": macs,
            "calls_per_sample": out.calls,
            "macs_per_sample": macs * out.calls,
            "latency_ms_per_call": lat_call[key] * 1e3,
            "latency_s_per_run": lat_run[key],
        }
        if digits:
            imgs = out.images if key == "reference" else cand_img
            m.update(_digits_metrics(imgs, labels, classifier, real_feats))
        models[key] = m

    data = {
        "diffpress_version": __version__,
        "settings": {"num_samples": num_samples, "steps": steps, "scheduler": scheduler or "model default",
                     "guidance": guidance, "seed": seed, "latency_repeats": latency_repeats},
        "fidelity": fidelity,
        "models": models,
        "notes": notes,
    }
    return Report(data, ref_img, cand_img, notes)
