"""Do exported W8A8 graphs agree with the simulation on CPUs without VNNI? And what does each remedy cost?

    python benchmarks/cpu_agreement.py [--models digits-cond-unet digits-dit] [--samples 100]
                                       [--qemu-cpu Haswell] [--out benchmarks/results/cpu_agreement.json]

For each model and quantization variant (target `any`: 7-bit int8 weights, the default; target `vnni`:
full-range int8 weights; signed symmetric activations, i.e. ONNX Runtime's S8S8 kernels), the W8A8 ONNX
export runs in ONNX Runtime three ways on the same inputs: fused integer kernels on this CPU, the same graph with optimizations off (float
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
import sys
import tempfile
from pathlib import Path


VARIANTS = {"target any (default): 7-bit int8 weights": {"target": "any"},
            "target vnni: full-range int8 weights": {"target": "vnni"},
            "target vnni + symmetric int8 activations (S8S8)": {"target": "vnni", "symmetric_activations": True}}


def gap(model: Path, feeds: dict, emulate: str | None) -> float | str:
    """Fused integer kernels against float Q/DQ, or ONNX Runtime's error if it refuses the graph."""
    from diffpress import DiffpressError
    from diffpress.exporters.cpu import run_onnx
    from diffpress.exporters.plan import rel_rms

    try:
        return rel_rms(run_onnx(model, feeds, emulate=emulate), run_onnx(model, feeds, optimize=False, emulate=emulate))
    except DiffpressError as exc:
        return str(exc)


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
    from diffpress.exporters.cpu import cpu_flags

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
            feeds = {k: v.numpy() for k, v in zip(io_names(den), inputs)}
            for label, overrides in VARIANTS.items():
                q = den.copy()
                diffpress.quantize_(q, diffpress.QuantizeConfig(**overrides), cs, progress=False)
                model = work / f"{name}-{len(rows)}"
                diffpress.export_onnx(q, model, verify=False)
                quality = diffpress.evaluate(den, q, num_samples=args.samples, progress=False)["fidelity"]
                row = {"model": name, "variant": label, "config": overrides,
                       "native_fused_vs_float_qdq": gap(model / "model.onnx", feeds, None),
                       f"{args.qemu_cpu}_fused_vs_float_qdq": gap(model / "model.onnx", feeds, args.qemu_cpu),
                       "psnr_vs_fp_db_simulated": quality["psnr_db"], "ssim": quality["ssim"]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {"settings": {**vars(args), "out": str(args.out), "machine": platform.machine(),
                           "host_cpu": cpu_flags()}, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
