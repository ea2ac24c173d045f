"""Calibration over several processes, and the memory of a calibration set streamed to disk.

    python benchmarks/distributed.py [--part speed prune memory] [--repeats R] [--out benchmarks/results/distributed.json]

``speed``: ``diffpress run fast --model digits-cond-unet`` (64 calibration trajectories of 50 DDIM steps in 4 chunks
of 16, 10 steps kept, guidance 3; round-to-nearest W8A8; a 16-sample evaluation, no exports) as one process (torch's
default threads, then one thread) and under ``torchrun --standalone --nproc_per_node 2`` (one thread per
process, torchrun's default). Wall time of the whole command and of the calibrate and quantize stages (from
each run's report), and whether the compressed models are bit-identical.

``prune``: the same three launches of ``diffpress run prune30 --model digits-cond-unet`` without its recovery
(``passes.0.recover=null``: distillation follows the clock, so it is neither comparable nor reproducible), same
calibration, Taylor importance over 800 calibration points (every kept timestep: diff_pruning's default stops
after a few), in pieces of 16 split over the ranks: the prune stage (graph capture, dependency units,
importance, selection) and whether the pruned models are bit-identical.

``memory``: the SD 1.5 UNet architecture with random weights at latent 16x16 (4 channels), text states of
77 x 768 (random, labelled as such), ``diffpress.calibrate`` of 64 trajectories x 10 DDIM steps, all 10 kept,
guidance 3 (1280 inputs), chunks of 8 trajectories: held in memory vs streamed to disk (``path=``), each in a
fresh process; peak resident memory (``ru_maxrss``) of the process, and of the same process after loading the
model alone, so the set's share is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["--no-progress", "--set", "calibration.batch_size=16", "--set", "exports=[]", "--set", "evaluation.samples=16",
       "--set", "evaluation.metrics=[psnr, ssim]", "--set", "evaluation.latency_repeats=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

_MEMORY_CHILD = """
import resource, sys, time, torch
from diffpress import Denoiser
from diffpress.calibration import TimestepPolicy, collect
from diffpress.zoo import architectures
model = architectures.build("sd15-unet", sample_size=16)
den = Denoiser(model, cond_shape=(77, model.config.cross_attention_dim))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cond = torch.randn(64, *den.cond_shape, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
cs = collect(den, num_samples=64, steps=10, policy=TimestepPolicy("all"), cond=cond, batch_size=8, guidance=3.0,
             path=sys.argv[1] if len(sys.argv) > 1 else None, progress=False)
n = sum(len(x) for x, _, _ in cs.batches(64))  # read it all back (from disk when streamed)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(cs), n, round(time.perf_counter() - t0, 1))
"""


def _timed(cmd: list[str], cwd: Path, threads: int | None) -> float:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return round(time.perf_counter() - t0, 1)


def speed(work: Path, recipe: str = "fast", extra: tuple[str, ...] = (), stage: str = "pass 0: quantize",
          repeats: int = 1) -> dict:
    """The three launches, ``repeats`` interleaved rounds; medians of each timing."""
    cli = ["-m", "diffpress.cli", "run", recipe, "--model", "digits-cond-unet"]
    runs = {"1 process, default threads": ([sys.executable, *cli], None),
            "1 process, 1 thread": ([sys.executable, *cli], 1),
            "torchrun 2 processes, 1 thread each": ([*TORCHRUN, *cli], 1)}
    seen: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(repeats):
        for i, (name, (cmd, threads)) in enumerate(runs.items()):
            out = f"{recipe}{i}-{r}"
            wall = _timed([*cmd, "--out", out, *RUN, *extra], work, threads)
            report = json.loads((work / out / "report.json").read_text())
            timings = report["timings_s"]
            row = {"wall_s": wall, "calibrate_s": timings.get("calibrate"),
                   f"{stage.split(': ')[-1]}_s": timings.get(stage), "evaluate_s": timings.get("evaluate"),
                   "psnr_db": report["evaluation"]["fidelity"]["psnr_db"]}
            if "importance_seconds" in report["passes"][0]:
                row["importance_s"] = round(report["passes"][0]["importance_seconds"], 2)
            seen[name].append(row)
            print(name, row, flush=True)
    rows = {name: {k: statistics.median(row[k] for row in got) for k in got[0]} | {"repeats": len(got)}
            for name, got in seen.items()}
    from safetensors import safe_open

    files = [safe_open(str(p), "pt") for p in sorted(work.glob(f"{recipe}*-*/model/compressed.safetensors"))]
    rows["models_bit_identical"] = all(
        list(f.keys()) == list(files[0].keys()) and all(f.get_tensor(k).equal(files[0].get_tensor(k)) for k in f.keys())
        for f in files[1:])
    return rows


def prune(work: Path, repeats: int = 1) -> dict:
    return speed(work, "prune30", ("--set", "passes.0.recover=null", "--set", "passes.0.importance=taylor",
                                   "--set", "passes.0.samples=800"), "pass 0: prune", repeats)


def memory(work: Path) -> dict:
    rows = {}
    for name, extra in (("in memory", []), ("streamed to disk", [str(work / "cal.safetensors")])):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, *extra], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        base, peak, items, read, secs = proc.stdout.split()[-5:]
        rows[name] = {"peak_rss_mb": round(int(peak) / 1024), "model_only_rss_mb": round(int(base) / 1024),
                      "calibration_share_mb": round((int(peak) - int(base)) / 1024), "inputs": int(items),
                      "read_back": int(read), "seconds": float(secs)}
        print(name, rows[name], flush=True)
    rows["file_mb"] = round((work / "cal.safetensors").stat().st_size / 2 ** 20)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["speed", "prune", "memory"], choices=["speed", "prune", "memory"])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the speed / prune launches "
                        "(medians reported)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.json"))
    args = parser.parse_args()
    import torch

    from diffpress.exporters.cpu import cpu_flags

    results = {"settings": {"machine": platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                            "torch": torch.__version__, "python": platform.python_version()}}
    if args.out.exists():
        results.update({k: v for k, v in json.loads(args.out.read_text()).items() if k in ("speed", "prune", "memory")})
    with tempfile.TemporaryDirectory(prefix="diffpress-dist-") as tmp:
        for part in args.part:
            fn = {"speed": speed, "prune": prune, "memory": memory}[part]
            results[part] = fn(Path(tmp)) if part == "memory" else fn(Path(tmp), repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
