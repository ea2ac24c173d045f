"""Do exported W8A8 graphs agree with the simulation on CPUs without VNNI? And what does each remedy cost?

    python benchmarks/cpu_agreement.py [--models digits-cond-unet digits-dit] [--samples 100]
                                       [--qemu-cpu Haswell] [--out benchmarks/results/cpu_agreement.json]

For each model and quantization variant (full-range int8 weights; `reduce_range` 7-bit weights; signed
symmetric activations, i.e. ONNX Runtime's S8S8 kernels), the W8A8 ONNX export runs in ONNX Runtime three
ways on the same inputs: fused integer kernels on this CPU, the same graph with optimizations off (float
Q/DQ arithmetic, which matches the PyTorch simulation), and fused integer kernels under
`qemu-x86_64 -cpu <qemu-cpu>` (Debian's qemu-user: an AVX2 CPU without VNNI, emulated, so ONNX Runtime's
kernel dispatch takes its AVX2 path). Figures: relative RMS of each fused run against the float Q/DQ run,
and the quality of each variant (PSNR of the PyTorch simulation against full precision, same seeds).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUNNER = """
import sys, numpy as np, onnxruntime as ort
path, out, level = sys.argv[1], sys.argv[2], sys.argv[3]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all"
                               else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[4]))
np.save(out, s.run(None, feeds)[0])
"""
VARIANTS = {"full-range int8 weights": {}, "reduce_range (7-bit weights)": {"reduce_range": True},
            "symmetric int8 activations (S8S8)": {"symmetric_activations": True}}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()) / np.sqrt((b ** 2).mean()))


def run_ort(model: Path, feeds: Path, level: str, work: Path, qemu_cpu: str | None) -> np.ndarray | str:
    """The graph's output, or ONNX Runtime's error (its last line) if it refuses the graph."""
    script, out = work / "runner.py", work / f"out-{level}-{qemu_cpu or 'native'}.npy"
    script.write_text(RUNNER)
    cmd = [sys.executable, str(script), str(model), str(out), level, str(feeds)]
    if qemu_cpu:
        cmd = [shutil.which("qemu-x86_64"), "-cpu", qemu_cpu, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return proc.stderr.strip().splitlines()[-1][:300]
    return np.load(out)


def compare(got: np.ndarray | str, ref: np.ndarray | str) -> float | str:
    return got if isinstance(got, str) else ref if isinstance(ref, str) else rel(got, ref)


def main() -> None:
    import torch

    import diffpress
    from diffpress.exporters.onnx import example_feed, io_names

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "digits-dit"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--qemu-cpu", default="Haswell")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_agreement.json"))
    args = parser.parse_args()
    if shutil.which("qemu-x86_64") is None:
        sys.exit("qemu-x86_64 is not installed (apt-get install qemu-user)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            den = diffpress.load(name)
            cs = diffpress.calibrate(den, num_samples=64, steps=50, policy=diffpress.TimestepPolicy("uniform", count=10),
                                     progress=False)
            # one timestep per batch: timestep-grouped scales are picked from the first item
            inputs = list(example_feed(den, 4, seed=7))
            inputs[1] = torch.full((4,), 600.0)
            feeds = work / f"{name}-feeds.npz"
            np.savez(feeds, **{k: v.numpy() for k, v in zip(io_names(den), inputs)})
            for label, overrides in VARIANTS.items():
                q = den.copy()
                diffpress.quantize_(q, diffpress.QuantizeConfig(**overrides), cs, progress=False)
                model = work / f"{name}-{len(rows)}"
                diffpress.export_onnx(q, model, verify=False)
                ref = run_ort(model / "model.onnx", feeds, "none", work, None)
                native = run_ort(model / "model.onnx", feeds, "all", work, None)
                emulated = run_ort(model / "model.onnx", feeds, "all", work, args.qemu_cpu)
                quality = diffpress.evaluate(den, q, num_samples=args.samples, progress=False)["fidelity"]
                row = {"model": name, "variant": label, "config": overrides,
                       "native_fused_vs_float_qdq": compare(native, ref),
                       f"{args.qemu_cpu}_fused_vs_float_qdq": compare(emulated, ref),
                       "psnr_vs_fp_db_simulated": quality["psnr_db"], "ssim": quality["ssim"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"settings": {**vars(args), "out": str(args.out), "machine": platform.machine(),
                           "host_cpu": _cpu_flags()}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return sorted({f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in text})


if __name__ == "__main__":
    main()
