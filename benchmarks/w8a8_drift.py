"""Why a random-weight SD 1.5 W8A8 export fails its end-to-end verification: every arithmetic of the same
quantized model (PyTorch's quantized_decomposed ops, PyTorch's plain round/clamp, ONNX Runtime's float Q/DQ graph,
ONNX Runtime's fused int8 kernels) lands as far from the others as from the float model.

    python benchmarks/w8a8_drift.py [--arch sd15-unet] [--sample-size 16] [--seeds 5 6 7]
                                    [--out benchmarks/results/w8a8_drift.json]

The architecture with random weights (``onnx_speed.random_model``: a 4-trajectory calibration from its own
sampler), ``QuantizeConfig()`` (W8A8, round to nearest, output requantization), exported with
``export_onnx(rtol=1.0)`` so that the file is kept; then, per input seed (batch 1), relative RMS distances between
the float model, the PyTorch simulation in modes ``evaluate`` and ``plain``, and ONNX Runtime without graph
optimisation (the Q/DQ graph in float) and with it (integer kernels). One thread for ONNX Runtime.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from onnx_speed import random_model  # benchmarks/, beside this script

from diffpress.compress import QuantizeConfig, quantize_
from diffpress.exporters import export_onnx
from diffpress.exporters.cpu import cpu_flags, run_onnx
from diffpress.exporters.plan import example_feed, rel_rms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15-unet")
    parser.add_argument("--sample-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/w8a8_drift.json"))
    args = parser.parse_args()
    den, cs = random_model(args.arch, args.sample_size)
    q = den.copy()
    quantize_(q, QuantizeConfig(), cs, progress=False)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        res = export_onnx(q, Path(tmp) / "m", batch=1, rtol=1.0)
        names = [i["name"] for i in json.loads((Path(tmp) / "m" / "io_spec.json").read_text())["inputs"]]
        for seed in args.seeds:
            feed = example_feed(q, 1, seed=seed)
            feeds = {n: v.numpy() for n, v in zip(names, feed)}
            with torch.no_grad():
                fp, evaluate = den(*feed), q(*feed)
                with q.runtime.using(mode="plain"):
                    plain = q(*feed)
            outs = {"fp32": fp, "pytorch_evaluate": evaluate, "pytorch_plain": plain,
                    "ort_qdq_float": torch.from_numpy(run_onnx(Path(tmp) / "m" / "model.onnx", feeds, optimize=False)),
                    "ort_int8": torch.from_numpy(run_onnx(Path(tmp) / "m" / "model.onnx", feeds, optimize=True))}
            keys = list(outs)
            rows[seed] = {f"{a}~{b}": round(rel_rms(outs[b], outs[a]), 4)
                          for i, a in enumerate(keys) for b in keys[i + 1:]}
            print(seed, json.dumps(rows[seed]), flush=True)
    result = {"settings": {"arch": args.arch, "sample_size": args.sample_size, "config": "QuantizeConfig() (W8A8 RTN)",
                           "export_verification": res.verification["checks"], "cpu_flags": cpu_flags(),
                           "torch": torch.__version__},
              "rel_rms": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
