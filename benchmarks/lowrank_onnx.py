"""W4A8 with a low-rank branch vs W8A8 vs fp32 in ONNX Runtime (CPU), measured side by side in one run.

    python benchmarks/lowrank_onnx.py [--archs sd15-unet dit-xl-2] [--sample-size 16] [--repeats 10]
                                      [--threads 1] [--out benchmarks/results/lowrank_onnx.json]

Real-size architectures with random weights (diffpress.zoo.architectures; no download), latent 16, batch 1:
the speed and size of the graphs do not depend on the weight values, so quality is not measured here (see
benchmarks/lowrank.py). Calibration: the random model's own sampler, 4 trajectories, 5 steps. The lowrank pass
runs with a fixed alpha 0.5, no refinement and the randomized SVD here (the per-layer alpha search, the refinement
and full float64 SVDs of SD-sized layers take long on 2 cores and change neither a byte nor a node of the graph).
Rows:

- ``fp32``; ``w8a8`` (the w8a8 recipe's quantizer: int8 per channel, static int8 activations);
- ``w4a8-lowrank``: rank 32, int4 weights in groups of 64 where they divide the input, per channel elsewhere
  (INT4 initializers, the smallest file), static int8 activations, the branch in fp16 (``--variants`` adds
  ``w4a8-lowrank-int8kernels``: per-channel int4 weights in INT8 initializers (``int4_export=int8``), so that
  ONNX Runtime's integer kernels run them, at 8-bit file size).

Latency is the median of interleaved repeats (one session after the other, round after round); bytes are the
.onnx files (+ external data); op counts are those of ONNX Runtime's optimised graph.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from onnx_speed import (  # benchmarks/onnx_speed.py, beside this script
    FLOAT_COMPUTE,
    INT_COMPUTE,
    folder_bytes,
    interleaved_medians,
    random_model,
)

from diffpress import Denoiser, export_onnx
from diffpress.compress import LowRankConfig, QuantizeConfig, lowrank_, quantize_
from diffpress.exporters.cpu import cpu_flags
from diffpress.exporters.onnx import example_feed, ort_session

W4A8 = {"weights": "int4", "group_size": 64, "activations": "int8", "act_mode": "static"}


def variants(den: Denoiser, cs, wanted: list[str]):
    """Yields (name, compressed copy, pass seconds), one at a time, so that one SD-sized copy is in memory at once."""
    yield "fp32", den, 0.0
    t0 = time.perf_counter()
    q = den.copy()
    quantize_(q, QuantizeConfig(), cs, progress=False)
    yield "w8a8", q, time.perf_counter() - t0
    del q
    for name, group, export in (("w4a8-lowrank", 64, "int4"), ("w4a8-lowrank-int8kernels", None, "int8")):
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        lr = den.copy()
        lowrank_(lr, LowRankConfig(rank=32, alpha=0.5, refine_iters=0, branch_dtype="float16", svd="randomized",
                                   **{**W4A8, "group_size": group}), cs, progress=True)
        quantize_(lr, QuantizeConfig(**{**W4A8, "group_size": group}, group_fallback="per_channel",
                                     int4_export=export), cs, progress=False)
        yield name, lr, time.perf_counter() - t0
        del lr


def bench(name: str, sample_size: int, repeats: int, threads: int, work: Path, wanted: list[str],
          rtol: float | None = None) -> dict:
    den, cs = random_model(name, sample_size)
    rows, sessions = {}, {}
    for key, model_k, seconds in variants(den, cs, wanted):
        res = export_onnx(model_k, work / f"{name}-{key}", batch=1, opset=21, force=True, rtol=rtol)
        del model_k
        ops = res.ort_op_types
        rows[key] = {"pass_seconds": round(seconds, 1), "bytes": folder_bytes(work / f"{name}-{key}"),
                     "ort_integer_ops": {k: v for k, v in ops.items() if k in INT_COMPUTE},
                     "ort_float_compute_ops": {k: v for k, v in ops.items() if k in FLOAT_COMPUTE},
                     "dequantize_nodes": ops.get("DequantizeLinear", 0),
                     "verification": {"rel_rms_diff": res.verification["rel_rms_diff"],
                                      "rtol": res.verification["rtol"], "passed": res.verification["passed"]}}
        print(key, json.dumps(rows[key]), flush=True)
        sessions[key] = ort_session(work / f"{name}-{key}" / "model.onnx", threads=threads)
    feeds = example_feed(den, 1, seed=5)
    inputs = {k: {i.name: a.numpy() for i, a in zip(s.get_inputs(), feeds)} for k, s in sessions.items()}
    med = interleaved_medians(sessions, inputs, repeats, warmup=2)
    for k, row in rows.items():
        row.update(ms=med[k], speedup_vs_fp32=med["fp32"] / med[k], bytes_vs_w8a8=row["bytes"] / rows["w8a8"]["bytes"])
    return {"architecture": name, "sample_size": sample_size, "batch": 1, "threads": threads, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["dit-xl-2", "sd15-unet"])
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rtol", type=float, default=None,
                        help="verification tolerance of the exports (default: what the passes declare); the JSON "
                             "records the measured difference either way")
    parser.add_argument("--variants", nargs="+", default=["w4a8-lowrank"],
                        help="low-rank rows besides fp32 and w8a8: w4a8-lowrank, w4a8-lowrank-int8kernels")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowrank_onnx.json"))
    args = parser.parse_args()
    results = {"settings": {**vars(args), "out": str(args.out), "machine": platform.machine(),
                            "cpu_int8_flags": cpu_flags(), "torch": torch.__version__}, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for name in args.archs:
            row = bench(name, args.sample_size, args.repeats, args.threads, Path(work), args.variants, args.rtol)
            print(json.dumps({k: {kk: v[kk] for kk in ("ms", "speedup_vs_fp32", "bytes")} for k, v in row["rows"].items()}))
            results["runs"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
