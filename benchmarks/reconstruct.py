"""Rounding for PTQ on the zoo models: round-to-nearest vs bias correction vs AdaRound reconstruction.

    python benchmarks/reconstruct.py [--models digits-cond-unet digits-dit] [--samples 200]
                                     [--out benchmarks/results/reconstruct.json]

Quality against the full-precision model (PSNR / SSIM of final samples, same seeds), conditional
accuracy and FD to real digits, 50-step DDIM, guidance 3, as in ``benchmarks/ptq.py``. All quantized
figures are fake-quant simulations in PyTorch. Calibration: 64 trajectories, uniform policy over 10
steps (seed 1000); reconstruction uses 256 of those points, 500 steps per block, no time budget (so
the figures do not depend on the machine's load); ``seconds`` is the wall time of ``quantize_``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ptq import STEPS, measure, setup  # benchmarks/ptq.py, beside this script

import diffpress
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, ReconstructConfig, quantize_


def variants(weights: str) -> dict[str, QuantizeConfig]:
    block = ReconstructConfig(time_budget=None)
    layer = ReconstructConfig(time_budget=None, granularity="layer")
    out = {"nearest": QuantizeConfig(weights=weights),
           "nearest+bias_correction": QuantizeConfig(weights=weights, bias_correction=True),
           "adaround_block": QuantizeConfig(weights=weights, reconstruct=block),
           "adaround_layer+bias_correction": QuantizeConfig(weights=weights, reconstruct=layer, bias_correction=True),
           "adaround_block+bias_correction": QuantizeConfig(weights=weights, reconstruct=block, bias_correction=True)}
    if weights == "int8":
        out = {k: out[k] for k in ("nearest", "adaround_block+bias_correction")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "digits-dit"])
    parser.add_argument("--weights", nargs="+", default=["int4", "int8"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruct.json"))
    args = parser.parse_args()

    clf, real_feats, results = setup(samples=args.samples, calib_samples=64, calib_policy="uniform, 10 steps",
                                     activations="int8, mse rule, K=1", weights="per output channel")
    for name in args.models:
        den = diffpress.load(name)
        labels = torch.arange(args.samples) % 10
        print(f"== {name}", flush=True)
        fp, ref_images = measure(den, None, labels, clf, real_feats)
        res = {"fp32": fp}
        calib = collect(den, num_samples=64, steps=STEPS, policy=TimestepPolicy("uniform", count=10), progress=False)
        for weights in args.weights:
            for key, config in variants(weights).items():
                q = den.copy()
                t0 = time.perf_counter()
                rep = quantize_(q, config, calib, progress=False)
                seconds = round(time.perf_counter() - t0, 1)
                row, _ = measure(q, ref_images, labels, clf, real_feats)
                row["quantize_seconds"] = seconds
                if rep.reconstruction:
                    row["blocks_learned"] = sum(r["result"] == "adaround" for r in rep.reconstruction)
                    row["blocks"] = len(rep.reconstruction)
                res[f"w{weights[3:]}a8 {key}"] = row
                print(f"w{weights[3:]}a8 {key}", json.dumps(row), flush=True)
        results["models"][name] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
