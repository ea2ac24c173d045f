"""Timestep-aware PTQ on the zoo models: quality against the full-precision model, same seeds and sampler.

    python benchmarks/ptq.py [--models digits-cond-unet digits-dit] [--samples 500] [--table-samples 200]
                             [--out benchmarks/results/ptq.json]

All quantized figures are fake-quant simulations in PyTorch (integer arithmetic is only real in the
exported ONNX graph). For each model it reports, 50-step DDIM with guidance 3:
- the full-precision model: conditional accuracy, FD to real digits;
- W8A8 calibrated over the whole trajectory (uniform policy, 10 steps) vs a naive W8A8 calibrated on a
  single timestep (the middle step): PSNR / SSIM against FP, accuracy, FD;
- W4A8 (int4 weights, group 32 where it divides, else per channel);
- a table of activation range rules (max, percentile, mse) x timestep groups K (1, 2, 4), W8A8.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import diffpress
from diffpress.calibration import TimestepPolicy, collect
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.eval import metrics
from diffpress.zoo import load_classifier
from diffpress.zoo.data import load_digits

STEPS, GUIDANCE = 50, 3.0


def measure(den, ref_images, labels, clf, real_feats) -> dict:
    t0 = time.perf_counter()
    out = diffpress.sample(den, labels=labels, guidance=GUIDANCE, steps=STEPS, seed=0, progress=False)
    feats, logits = metrics.classifier_outputs(clf, out.images)
    row = {"cond_accuracy": metrics.conditional_accuracy(logits, labels),
           "fd_real": metrics.frechet_distance(feats.numpy(), real_feats),
           "seconds": round(time.perf_counter() - t0, 1)}
    if ref_images is not None:
        psnr = metrics.psnr(ref_images[: len(out.images)], out.images)
        row.update(psnr_db=psnr, ssim=metrics.ssim(ref_images[: len(out.images)], out.images))
    return row, out.images


def setup(**settings) -> tuple:
    """The digits classifier, its features of all real digits, and the results skeleton (sampling settings
    plus ``settings``) that the quantization benchmarks write."""
    clf = load_classifier()
    real_feats = metrics.classifier_outputs(clf, load_digits("all")[0])[0].numpy()
    results = {"settings": {"steps": STEPS, "scheduler": "ddim", "guidance": GUIDANCE, "seed": 0, **settings,
                            "simulated": "fake-quant in PyTorch", "machine": platform.machine(),
                            "torch": torch.__version__},
               "models": {}}
    return clf, real_feats, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "digits-dit"])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--table-samples", type=int, default=200)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ptq.json"))
    args = parser.parse_args()

    clf, real_feats, results = setup(samples=args.samples, table_samples=args.table_samples,
                                     calib_samples=args.calib_samples, calib_seed=1000)
    for name in args.models:
        den = diffpress.load(name)
        labels = torch.arange(args.samples) % 10
        print(f"== {name}")
        fp, ref_images = measure(den, None, labels, clf, real_feats)
        print("fp32", json.dumps(fp))
        res = {"fp32": fp}
        calib = collect(den, num_samples=args.calib_samples, steps=STEPS,
                        policy=TimestepPolicy("uniform", count=10), progress=False)
        # the naive baseline sees as many calibration inputs, all from one timestep (the middle step)
        mid = collect(den, num_samples=args.calib_samples * 10, steps=STEPS,
                      policy=TimestepPolicy("steps", steps=[STEPS // 2]), progress=False)
        runs = {
            "w8a8_timestep_aware": (QuantizeConfig(), calib),
            "w8a8_single_timestep": (QuantizeConfig(), mid),
            "w4a8": (QuantizeConfig(weights="int4", group_size=32), calib),
            "w4a8_per_channel": (QuantizeConfig(weights="int4"), calib),
        }
        for key, (config, cs) in runs.items():
            q = den.copy()
            rep = quantize_(q, config, cs, progress=False)
            row, _ = measure(q, ref_images, labels, clf, real_feats)
            row["float_layers"] = len([s for s in rep.skipped if "activation-activation" not in s["reason"]])
            row["quantized_layers"] = len(rep.quantized)
            res[key] = row
            print(key, json.dumps(row))
        if not args.skip_table:
            table = []
            n = args.table_samples
            for rule in ("max", "percentile", "mse"):
                for k in (1, 2, 4):
                    q = den.copy()
                    quantize_(q, QuantizeConfig(act_rule=rule, timestep_groups=k), calib, progress=False)
                    row, _ = measure(q, ref_images[:n], labels[:n], clf, real_feats)
                    row.update(rule=rule, timestep_groups=k)
                    table.append(row)
                    print("table", json.dumps(row))
            res["rules_x_groups_w8a8"] = table
        results["models"][name] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each model: partial results survive
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
