"""Low-rank outlier absorption on the zoo models: W4A8 and W4A4, each as round to nearest, smoothing only
(SmoothQuant), smoothing + low-rank (SVDQuant) and that + bias correction; a rank sweep; the choices the
pass makes (static vs dynamic int4 activations, the aggregation of activation maxima over timesteps).

    python benchmarks/lowrank.py [--models digits-cond-unet digits-dit] [--samples 200] [--ranks 8 16 32 64]
                                 [--out benchmarks/results/lowrank_<model>.json]

Quality against the full-precision model (PSNR / SSIM of final samples, same seeds), conditional accuracy and
FD to real digits, 50-step DDIM, guidance 3 (``benchmarks/ptq.py``'s settings). Every quantized figure is a
fake-quant simulation in PyTorch. Calibration: 64 trajectories, uniform policy over 10 steps (seed 1000).
Weights int4, groups of 64 where they divide a layer's input, per output channel elsewhere. W4A8: static int8
activations (MSE rule, one range per tensor); W4A4: dynamic int4 per token, groups of 64 channels (and static
per-tensor int4 for comparison). ``bytes``: the saved model folder (int4 packed two per byte, branch in fp32).
``pass_seconds``: wall time of lowrank_ + quantize_ on this CPU.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from ptq import STEPS, measure, setup  # benchmarks/ptq.py, beside this script

import diffpress
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import (
    LowRankConfig,
    QuantizeConfig,
    ReconstructConfig,
    lowrank_,
    quantize_,
)

ACTS = {"w4a8": dict(activations="int8", act_mode="static"),
        "w4a4": dict(activations="int4", act_mode="dynamic", act_group_size=64),
        "w4a4-static": dict(activations="int4", act_mode="static")}
WEIGHTS = dict(weights="int4", group_size=64)
RECONSTRUCT: dict = {}  # ReconstructConfig defaults: 500 steps per block, 256 calibration points


def variant(bits: str, kind: str, **lowrank) -> tuple[LowRankConfig | None, QuantizeConfig]:
    acts = ACTS[bits]
    q = QuantizeConfig(**WEIGHTS, group_fallback="per_channel", **acts,
                       quantize_outputs=acts["activations"] == "int8", bias_correction=kind.endswith("bias_correction"),
                       reconstruct=ReconstructConfig(time_budget=None, **RECONSTRUCT) if "adaround" in kind else None)
    if kind == "nearest":
        return None, q
    shared = {k: v for k, v in {**WEIGHTS, **acts}.items()}
    if kind == "smoothquant":
        return LowRankConfig(rank=0, **shared, **lowrank), q
    return LowRankConfig(**shared, **lowrank), q


def saved_bytes(den) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        den.save_pretrained(Path(tmp) / "m")
        return sum(p.stat().st_size for p in (Path(tmp) / "m").rglob("*") if p.is_file())


def row_specs(ranks: list[int]) -> list[tuple[str, str, str, dict]]:
    """(row name, bits, kind, extra LowRankConfig fields), in table order."""
    rows = []
    for bits in ("w4a8", "w4a4"):
        for kind in ("nearest", "smoothquant", "lowrank", "lowrank+bias_correction"):
            rows.append((f"{bits} {kind}", bits, kind, {}))
    rows.append(("w4a8 lowrank+adaround_block+bias_correction", "w4a8", "lowrank+adaround+bias_correction", {}))
    rows.append(("w4a8 lowrank+bias_correction branch=float16", "w4a8", "lowrank+bias_correction",
                 {"branch_dtype": "float16"}))
    rows += [("w4a4-static nearest", "w4a4-static", "nearest", {}),
             ("w4a4-static smoothquant", "w4a4-static", "smoothquant", {}),
             ("w4a4-static lowrank", "w4a4-static", "lowrank", {}),
             ("w4a4 lowrank act_stat=max", "w4a4", "lowrank", {"act_stat": "max"})]
    rows += [(f"w4a4 lowrank rank={r} uncapped", "w4a4", "lowrank", {"rank": r, "max_fraction": None})
             for r in ranks]
    return rows


def table(models: list[str]) -> str:
    """The README's markdown tables, from the JSON files this script wrote."""
    lines = []
    for name in models:
        rows = json.loads(Path(f"benchmarks/results/lowrank_{name}.json").read_text())["models"][name]
        fp = rows["fp32"]
        lines += [f"**{name}** (fp32: accuracy {fp['cond_accuracy']:.3f}, FD {fp['fd_real']:.1f}, "
                  f"{fp['bytes'] / 1e6:.2f} MB)", "",
                  "| row | PSNR dB | SSIM | accuracy | FD | MB | pass s |", "|---|---|---|---|---|---|---|"]
        order = [r[0] for r in row_specs([8, 16, 32, 64])]
        for key in sorted((k for k in rows if k != "fp32"), key=lambda k: order.index(k) if k in order else len(order)):
            r = rows[key]
            lines.append(f"| {key} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['cond_accuracy']:.3f} | "
                             f"{r['fd_real']:.1f} | {r['bytes'] / 1e6:.2f} | {r['pass_seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "digits-dit"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these (=NAME: that row only)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/lowrank_<model>.json")
    parser.add_argument("--merge", action="store_true", help="keep the rows already in --out, add / replace these")
    parser.add_argument("--reconstruct-iters", type=int, default=None, help="AdaRound steps per block (default 500)")
    parser.add_argument("--table", action="store_true", help="print the markdown tables of earlier runs and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.models))
        return
    if args.reconstruct_iters:
        RECONSTRUCT["iters"] = args.reconstruct_iters

    clf, real_feats, results = setup(samples=args.samples, calib_samples=64, calib_policy="uniform, 10 steps",
                                     weights="int4, group 64 where it divides, else per output channel")
    rows = row_specs(args.ranks)
    if args.only:
        rows = [r for r in rows if any(r[0] == o[1:] if o.startswith("=") else o in r[0] for o in args.only)]
    for name in args.models:
        out = args.out or Path(f"benchmarks/results/lowrank_{name}.json")
        den = diffpress.load(name)
        labels = torch.arange(args.samples) % 10
        print(f"== {name}", flush=True)
        fp, ref_images = measure(den, None, labels, clf, real_feats)
        res = {"fp32": {**fp, "bytes": saved_bytes(den)}}
        if args.merge and out.exists():  # add rows to an earlier run of the same settings
            earlier = json.loads(out.read_text())
            results["models"] = earlier["models"]
            res = {**earlier["models"].get(name, {}), **res}
        calib = collect(den, num_samples=64, steps=STEPS, policy=TimestepPolicy("uniform", count=10), progress=False)
        for key, bits, kind, extra in rows:
            lr, q = variant(bits, kind, **extra)
            cand = den.copy()
            t0 = time.perf_counter()
            report = lowrank_(cand, lr, calib, progress=False) if lr is not None else None
            quantize_(cand, q, calib, progress=False)
            seconds = round(time.perf_counter() - t0, 1)
            row, _ = measure(cand, ref_images, labels, clf, real_feats)
            row.update(pass_seconds=seconds, bytes=saved_bytes(cand))
            if report is not None:
                layers = report.layers
                row["lowrank"] = {"layers": len(layers), "ranks": sorted({x["rank"] for x in layers}),
                                  "branch_params": sum(cand.get_submodule(x["name"]).branch.down.numel()
                                                       + cand.get_submodule(x["name"]).branch.up.numel()
                                                       for x in layers if x["rank"]),
                                  "smoothing": {w: sum(x["smooth"].startswith(w) for x in layers)
                                                for w in ("folded", "mul", "none")},
                                  "alphas": {str(a): sum(x["alpha"] == a for x in layers)
                                             for a in sorted({x["alpha"] for x in layers}, key=lambda v: -1 if v is None else v)},
                                  "mean_layer_error": {k: sum(x[k] for x in layers) / len(layers)
                                                       for k in ("err_rtn", "err_smooth", "err_svd", "err_lowrank")},
                                  "refine_steps_mean": sum(x["refine_steps"] for x in layers) / len(layers)}
            res[key] = row
            print(key, json.dumps(row), flush=True)
            results["models"][name] = res
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
