"""Bytes of what `diffpress run w4a8` and `diffpress run w8a8` write: `model/` (compressed.safetensors) and `onnx/`.

    python benchmarks/artifact_bytes.py [--models digits-cond-unet dit-xl-2] [--recipes w8a8 w4a8]
                                        [--out benchmarks/results/artifact_bytes.json]

A zoo name runs the built-in recipe as it is (`diffpress run RECIPE --model NAME`, quality figures included).
An architecture of diffpress.zoo.architectures (real size, random weights, latent 16x16) runs the same recipe
with a small calibration (4 trajectories x 10 steps), no reconstruction or bias correction and a 2-sample
evaluation: they change no byte of the artifacts, and on 2 CPU cores the full recipe would take hours.
Also counted: the ONNX initializers by data type (INT4 / INT8 / FLOAT) and the packed int4 tensors of
compressed.safetensors.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import torch
from safetensors import safe_open

from diffpress import Denoiser, run_recipe
from diffpress.zoo import DENOISERS, architectures

QUICK = ["calibration.samples=4", "calibration.steps=10", "calibration.policy.count=5", "calibration.batch_size=4",
         "passes.0.reconstruct=null", "passes.0.bias_correction=false", "evaluation.samples=2", "evaluation.steps=4",
         "evaluation.metrics=[size]", "exports=[{format: onnx}]"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def onnx_dtypes(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer))


def measure(model: str, recipe: str, work: Path) -> dict:
    t0 = time.perf_counter()
    if model in DENOISERS:
        target, overrides = model, []
    else:
        target, overrides = Denoiser(architectures.build(model, sample_size=16)), QUICK
    out = work / f"{recipe}-{model}"
    res = run_recipe(recipe, target, out=out, overrides=overrides, progress=False)
    with safe_open(str(out / "model" / "compressed.safetensors"), framework="pt") as f:
        packed = json.loads((f.metadata() or {}).get("packed", "{}"))
    row = {"model": model, "recipe": recipe, "overrides": overrides,
           "model_dir_bytes": folder_bytes(out / "model"),
           "compressed_safetensors_bytes": (out / "model" / "compressed.safetensors").stat().st_size,
           "onnx_bytes": folder_bytes(out / "onnx"), "onnx_initializer_dtypes": onnx_dtypes(out / "onnx" / "model.onnx"),
           "packed_int4_tensors": len(packed), "state_dict_bytes_reference": res["size"]["reference_bytes"],
           "seconds": round(time.perf_counter() - t0, 1)}
    if model in DENOISERS:
        row["psnr_db"] = res["evaluation"]["fidelity"]["psnr_db"]
        row["ort_speed"] = res.report.get("speed") and {k: res["speed"][k] for k in ("fp32_ms", "compressed_ms", "speedup")}
        row["onnx_fp32_bytes"] = res["size"].get("onnx_fp32_bytes")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits-cond-unet", "dit-xl-2"])
    parser.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/artifact_bytes.json"))
    args = parser.parse_args()
    results = {"settings": {**vars(args), "out": str(args.out), "machine": platform.machine(),
                            "processor": platform.processor(), "torch": torch.__version__}, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            for recipe in args.recipes:
                row = measure(model, recipe, Path(work))
                print(json.dumps(row, default=str), flush=True)
                results["runs"].append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
