"""ExecuTorch on this CPU: digits-cond-unet in fp32 and W8A8 as ``.pte`` programs (XNNPACK backend), side by side.

    python benchmarks/executorch.py [--model digits-cond-unet] [--samples 100] [--groups 1 4] [--repeats 200]
                                    [--out benchmarks/results/executorch.json]

W8A8 is the ``w8a8`` recipe's quantize pass (int8 per-channel weights, static int8 activations with the MSE rule,
block reconstruction with a 60 s budget, bias correction; calibration: 64 trajectories, 10 of 50 DDIM steps,
seed 1000), once per entry of ``--groups`` (timestep groups: one ``.pte`` method per group). Each model is lowered
with ``diffpress.exporters.executorch.export_executorch`` (batch 2: one sample with its guidance branch).

- ``bytes``: the ``.pte`` file; ``lowering_seconds``: torch.export + XNNPACK lowering on this CPU;
- ``latency_ms``: median of one program call (batch 2), the ExecuTorch thread pool at one thread, the programs
  timed round after round in turn (interleaved), so machine noise hits them alike; ``speedup``: fp32 / int8;
- quality: ``--samples`` seeds (0..N-1, labels i % 10), 50-step DDIM, guidance 3, sampled *through the .pte*
  (``load_executorch``): PSNR / SSIM against the PyTorch quantized model and against the PyTorch fp32 model on the
  same seeds, conditional accuracy and FD to real digits. The PyTorch W8A8 rows are fake-quant simulation; the
  ``.pte`` rows run XNNPACK's integer kernels.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

# this file's name shadows the executorch package while its folder leads sys.path: import the package first
_here = sys.path.pop(0)
from diffpress.exporters import executorch as et  # noqa: E402

et._require()
sys.path.append(_here)

import torch  # noqa: E402
from onnx_speed import interleaved_medians  # noqa: E402  (benchmarks/, beside this script)
from ptq import GUIDANCE, STEPS, setup  # noqa: E402

import diffpress  # noqa: E402
from diffpress.calibration import collect  # noqa: E402
from diffpress.compress import quantize_  # noqa: E402
from diffpress.eval import metrics  # noqa: E402
from diffpress.exporters.cpu import cpu_flags  # noqa: E402
from diffpress.exporters.plan import example_feed  # noqa: E402
from diffpress.recipes.schema import load_recipe  # noqa: E402


class _Timed:
    """An ExecuTorch method behind ONNX Runtime's ``run`` signature, for ``interleaved_medians``."""

    def __init__(self, method):
        self.method = method

    def run(self, _outputs, feed):
        return self.method.execute(feed)


def quality(den, labels, clf, real_feats, refs: dict) -> dict:
    t0 = time.perf_counter()
    images = diffpress.sample(den, labels=labels, guidance=GUIDANCE, steps=STEPS, seed=0, batch_size=len(labels),
                              progress=False).images
    feats, logits = metrics.classifier_outputs(clf, images)
    row = {"cond_accuracy": metrics.conditional_accuracy(logits, labels),
           "fd_real": metrics.frechet_distance(feats.numpy(), real_feats),
           "sampling_seconds": round(time.perf_counter() - t0, 1)}
    for name, ref in refs.items():
        row[f"psnr_vs_{name}"] = metrics.psnr(ref, images)
        row[f"ssim_vs_{name}"] = metrics.ssim(ref, images)
    return row, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cond-unet")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/executorch.json"))
    args = parser.parse_args()

    clf, real_feats, results = setup(samples=args.samples, calib_samples=64, calib_seed=1000)
    results["settings"].update(runtime="executorch.runtime (XNNPACK delegate + portable kernels)", threads=1,
                               batch=2, cpu_flags=cpu_flags(), processor=platform.processor() or platform.machine(),
                               simulated="PyTorch W8A8 rows: fake-quant; .pte rows: XNNPACK integer kernels")
    den = diffpress.load(args.model)
    labels = torch.arange(args.samples) % 10
    recipe = load_recipe("w8a8")
    c = recipe.calibration
    cs = collect(den, num_samples=c.samples, steps=c.steps, policy=c.policy, seed=c.seed,
                 progress=False)
    work = Path(tempfile.mkdtemp(prefix="diffpress-et-"))
    rows: dict = {}
    fp_images = diffpress.sample(den, labels=labels, guidance=GUIDANCE, steps=STEPS, seed=0, batch_size=len(labels),
                                 progress=False).images
    models = {"fp32": den}
    for k in args.groups:
        q = den.copy()
        config = recipe.passes[0].config
        config.timestep_groups = k
        t0 = time.perf_counter()
        quantize_(q, config, cs, progress=False)
        rows[f"w8a8_g{k}"] = {"quantize_seconds": round(time.perf_counter() - t0, 1)}
        models[f"w8a8_g{k}"] = q
    for name, model in models.items():
        print(f"== {name}: lowering", flush=True)
        spec = et.export_executorch(model, work / name, batch=2)
        row = rows.setdefault(name, {})
        row.update(bytes=spec["bytes"], lowering_seconds=spec["lowering_seconds"], methods=spec["methods"],
                   verification_rel_rms=spec["verification"]["rel_rms_diff"],
                   delegation={m: {k: v for k, v in d.items() if k != "ops"} for m, d in spec["delegation"].items()})
        refs = {"fp32_pytorch": fp_images}
        if name != "fp32":
            pt_row, pt_images = quality(model, labels, clf, real_feats, {"fp32_pytorch": fp_images})
            row["pytorch_fake_quant"] = pt_row
            refs["pytorch_quantized"] = pt_images
        row["pte"], _ = quality(et.load_executorch(work / name, like=model), labels, clf, real_feats, refs)
        print(name, json.dumps(row), flush=True)

    et.set_threads(1)
    feed = [v.contiguous() for v in example_feed(den, 2, seed=5)]
    timed, feeds = {}, {}
    for name in models:
        program = et.ExecuTorchModel(work / name, den.cond_names)
        timed[name], feeds[name] = _Timed(program.methods[0]), feed
    ms = interleaved_medians(timed, feeds, args.repeats, warmup=10)
    for name, v in ms.items():
        rows[name]["latency_ms"] = round(v, 3)
        rows[name]["speedup_vs_fp32_pte"] = round(ms["fp32"] / v, 3)
    results["models"][args.model] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
