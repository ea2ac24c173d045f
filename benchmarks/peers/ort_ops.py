"""Why ONNX Runtime's own W8A8 graph runs faster than diffpress's on a model: op counts and per-op kernel time.

    python benchmarks/peers/ort_ops.py [--model digits-cond-unet] [--runs 30]

Exports the model in fp32, quantizes it with diffpress (W8A8, round to nearest: the graph structure of the w8a8
recipe) and with ONNX Runtime's ``quantize_static`` restricted to Conv / MatMul / Gemm (as in
``benchmarks/peers/run.py``), both calibrated on 16 trajectories; prints the op types of each graph after ONNX
Runtime's optimizer, then ONNX Runtime's profile (``enable_profiling``) of ``--runs`` calls at batch 2, one
thread: milliseconds per call by op type. Exploratory: the profile's own overhead is in every figure.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import diffpress
from diffpress import export_onnx
from diffpress.compress import QuantizeConfig, quantize_
from diffpress.exporters.onnx import example_feed

sys.path.insert(0, str(Path(__file__).parent))
from run import ort_quantize_static  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cond-unet")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = Path(tempfile.mkdtemp(prefix="ort-ops-"))
    den = diffpress.load(args.model)
    cs = diffpress.calibrate(den, num_samples=16, steps=50, seed=1000, progress=False)
    export_onnx(den, w / "fp32")
    q = den.copy()
    quantize_(q, QuantizeConfig(), cs, progress=False)
    export_onnx(q, w / "diffpress")
    ort_quantize_static(w / "fp32", w / "ort.onnx", cs, "QInt8", ["Conv", "MatMul", "Gemm"])
    feeds = example_feed(den, 2, seed=5)
    for name, path in (("fp32", w / "fp32" / "model.onnx"), ("diffpress", w / "diffpress" / "model.onnx"),
                       ("onnxruntime", w / "ort.onnx")):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.optimized_model_filepath = str(w / f"{name}.opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(str(w / f"{name}.opt.onnx")).graph.node)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = 1, 3, True
        so.profile_file_prefix = str(w / f"profile_{name}")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feeds)}
        for _ in range(args.runs):
            sess.run(None, feed)
        by = collections.Counter()
        for e in json.loads(Path(sess.end_profiling()).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                by[e["args"]["op_name"]] += e["dur"]
        total = sum(by.values()) / args.runs / 1000
        print(f"{name}: {total:.2f} ms per call (kernels)", file=sys.stdout)
        print("  ms by op:", {k: round(v / args.runs / 1000, 3) for k, v in by.most_common(12)})
        print("  ops after optimization:", dict(ops.most_common(16)))


if __name__ == "__main__":
    main()
