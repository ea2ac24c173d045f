"""Compress a digits denoiser end to end with the Python API: load, calibrate with a custom timestep
policy, quantize (W8A8), evaluate against the original on the same seeds, save, export to ONNX.

    python examples/compress_digits.py [--model digits-cond-unet] [--out digits-w8a8] [--force]

About a minute on a 2-core CPU with the defaults. ``diffpress run fast`` runs a similar flow from a recipe
(uniform policy, one timestep group); this script shows the verbs it is made of.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import diffpress
from diffpress import QuantizeConfig, TimestepPolicy


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-cond-unet", help="zoo name or model/pipeline folder")
    p.add_argument("--out", type=Path, default=Path("digits-w8a8"), help="output folder")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories (default: 32)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps, calibration and evaluation (default: 25)")
    p.add_argument("--eval-samples", type=int, default=30, help="samples per model to compare (default: 30)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress = not args.no_progress
    taken = [str(args.out / sub) for sub in ("eval", "model", "onnx") if (args.out / sub).exists()]
    if taken and not args.force:  # check before minutes of work, not after
        p.error(f"{', '.join(taken)} already exist(s); pass --force to replace")

    den = diffpress.load(args.model)
    # PTQ4DM-style policy: steps drawn around 40 % of the trajectory, where most of the image forms,
    # instead of a uniform grid (TimestepPolicy("uniform", count=10), what the built-in recipes use)
    policy = TimestepPolicy("normal", count=8, mean=0.4, std=0.3, seed=0)
    calib = diffpress.calibrate(den, num_samples=args.calib_samples, steps=args.steps, policy=policy,
                                progress=progress)
    print(f"calibrated on {len(calib)} denoiser inputs at timesteps {[round(t) for t in calib.timesteps]}")

    q = den.copy()  # quantize_ rewrites in place; keep the original to measure against
    report = diffpress.quantize_(q, QuantizeConfig(weights="int8", activations="int8", timestep_groups=2), calib,
                                 progress=progress)
    print(report.summary().splitlines()[0])

    ev = diffpress.evaluate(den, q, num_samples=args.eval_samples, steps=args.steps, latency_repeats=3,
                            progress=progress)
    ev.save(args.out / "eval", force=args.force)  # report.json, report.md, grid.png
    q.save_pretrained(args.out / "model", force=args.force)  # diffpress.load(...) rebuilds it exactly
    onnx = diffpress.export_onnx(q, args.out / "onnx", force=args.force)  # Q/DQ graph, checked in ONNX Runtime

    fid = ev["fidelity"]
    worst = max(c["rel_rms_diff"] for c in onnx.verification["checks"])
    print(f"PSNR {fid['psnr_db']:.2f} dB, SSIM {fid['ssim']:.4f} against the original ({args.eval_samples} samples); "
          f"{ev['models']['reference']['bytes']:,} -> {ev['models']['candidate']['bytes']:,} bytes; "
          f"ONNX Runtime vs PyTorch rel. RMS diff {worst:.2g}; wrote {args.out}")
    return {"psnr_db": fid["psnr_db"], "ssim": fid["ssim"], "onnx_rel_diff": worst, "timesteps": calib.timesteps,
            "quantized_layers": len(report.quantized), "model": q}


if __name__ == "__main__":
    main()
