"""W8A8 ONNX vs fp32 ONNX in ONNX Runtime (CPU), measured side by side in one run.

    python benchmarks/onnx_speed.py [--archs sd15-unet dit-xl-2] [--sample-size 16] [--batch 1]
                                    [--repeats 20] [--threads 2] [--out benchmarks/results/onnx_speed.json]

Real-size architectures with random weights (diffpress.zoo.architectures; no download): the speed and
size of the graphs do not depend on the weight values. Calibration runs the random model's own sampler
for a few trajectories, which is enough to set activation ranges for a speed measurement (not for
quality). Latency is the median of interleaved repeats (fp32, int8, fp32, int8, ...), so machine noise
hits both alike; sizes are the bytes of the .onnx files (+ external data).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffpress import Denoiser, TimestepPolicy, calibrate, export_onnx, quantize_
from diffpress.compress import QuantizeConfig
from diffpress.exporters.cpu import cpu_flags
from diffpress.exporters.onnx import example_feed, ort_session
from diffpress.zoo import architectures

FLOAT_COMPUTE = ("Conv", "MatMul", "Gemm", "com.microsoft.nchwc::Conv", "com.microsoft::FusedMatMul",
                 "com.microsoft::FusedConv")
INT_COMPUTE = ("QLinearConv", "com.microsoft::QLinearConv", "QLinearMatMul", "com.microsoft::MatMulIntegerToFloat",
               "MatMulInteger", "com.microsoft::QGemm", "com.microsoft::MatMulNBits")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("model.onnx*"))


def random_model(name: str, sample_size: int) -> tuple[Denoiser, object]:
    """A real-size architecture with random weights and a small calibration set from its own sampler."""
    model = architectures.build(name, sample_size=sample_size)
    den = Denoiser(model, cond_shape=(77, model.config.cross_attention_dim) if name == "sd15-unet" else None)
    cond = None
    if den.cond_kind == "hidden_states":
        cond = torch.randn(4, *den.cond_shape, generator=torch.Generator().manual_seed(0))
    cs = calibrate(den, num_samples=4, steps=10, policy=TimestepPolicy("uniform", count=5), cond=cond,
                   batch_size=4, progress=False)
    return den, cs


def interleaved_medians(sessions: dict, inputs: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median latency (ms) of each ONNX Runtime session, timed round after round in turn, so that machine
    noise hits them alike."""
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, inputs[k])
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t1 = time.perf_counter()
            s.run(None, inputs[k])
            times[k].append(time.perf_counter() - t1)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench(name: str, sample_size: int, batch: int, repeats: int, threads: int, work: Path,
          skip_roles_weights: str | None = None, target: str = "any") -> dict:
    t0 = time.perf_counter()
    den, cs = random_model(name, sample_size)
    fp32 = export_onnx(den, work / f"{name}-fp32", batch=batch, force=True)
    q = den.copy()
    report = quantize_(q, QuantizeConfig(skip_roles_weights=skip_roles_weights, target=target), cs, progress=False)
    del den
    int8 = export_onnx(q, work / f"{name}-w8a8", batch=batch, force=True)
    feeds = example_feed(q, batch, seed=5)
    sessions = {k: ort_session(work / f"{name}-{k}" / "model.onnx", threads=threads) for k in ("fp32", "w8a8")}
    inputs = {k: {i.name: a.numpy() for i, a in zip(s.get_inputs(), feeds)} for k, s in sessions.items()}
    med = interleaved_medians(sessions, inputs, repeats)
    ops = int8.ort_op_types
    return {
        "architecture": name, "sample_size": sample_size, "batch": batch, "threads": threads,
        "skip_roles_weights": skip_roles_weights,
        "fp32_ms": med["fp32"], "w8a8_ms": med["w8a8"], "speedup": med["fp32"] / med["w8a8"],
        "fp32_bytes": folder_bytes(work / f"{name}-fp32"), "w8a8_bytes": folder_bytes(work / f"{name}-w8a8"),
        "size_ratio": folder_bytes(work / f"{name}-fp32") / folder_bytes(work / f"{name}-w8a8"),
        "quantized_layers": len(report.quantized),
        "ort_integer_ops": {k: v for k, v in ops.items() if k in INT_COMPUTE},
        "ort_float_compute_ops": {k: v for k, v in ops.items() if k in FLOAT_COMPUTE},
        "verification_fp32": fp32.verification["checks"], "verification_w8a8": int8.verification["checks"],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["sd15-unet", "dit-xl-2"])
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-roles-weights", choices=["int8"], default=None,
                        help="give the layers that skip_roles keep in float int8 weights (weight-only)")
    parser.add_argument("--target", choices=["any", "vnni"], default="any",
                        help="quantize target: any (7-bit int8 weights, exact on every x86 CPU) or vnni")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_speed.json"))
    args = parser.parse_args()
    results = {"settings": {**vars(args), "out": str(args.out), "machine": platform.machine(),
                            "processor": platform.processor(), "cpu_int8_flags": cpu_flags(),
                            "torch": torch.__version__}, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for name in args.archs:
            row = bench(name, args.sample_size, args.batch, args.repeats, args.threads, Path(work),
                        args.skip_roles_weights, args.target)
            print(json.dumps(row))
            results["runs"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
