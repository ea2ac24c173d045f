"""Learned caching schedules: searched vs uniform at equal MACs, cache + quantization, end to end in ONNX Runtime.

    python benchmarks/cache.py --model digits-cond-unet [--budgets 0.5 0.4 0.3] [--samplers ddim:50 dpm++:20]
                               [--samples 200] [--time-budget 180] [--out benchmarks/results/cache_<model>.json]
    python benchmarks/cache.py --quant --model digits-dit          # W8A8 + cache: quantizers refitted or not
    python benchmarks/cache.py --onnx [--archs sd15-unet dit-xl-2] [--repeats 3]   # whole loop in ORT
    python benchmarks/cache.py --table                             # the README tables from the JSON files

Digits (labels 0..9 repeated, guidance 3, evaluation seeds 0..N-1): for each sampler and budget, the uniform
rule (DeepCache / FORA: every N-th step computes; each skip level tried on the search seeds, the best kept) and
the searched schedule (``search``: greedy by feature drift, then local search on the final samples) with the
uniform schedule's MAC fraction as its budget, so both run at (at most) equal MACs. Search seeds 1000..1031,
held-out seeds 1032..1063 (the pass's own figures), evaluation on ``--samples`` further seeds: PSNR / SSIM
against the uncached model, conditional accuracy and FD of the digits classifier.

``--onnx``: real-size architectures with random weights at latent 16 (the weights do not change the cost):
fp32, cached fp32, W8A8, cached W8A8 exported to ONNX and run through ``diffpress.deploy`` (the whole 50-step
DDIM loop, batch 1, no guidance, one thread), timed side by side in interleaved rounds. The cached models use
the fixed uniform rule (``interval``; a search on random weights would be meaningless).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffpress
from diffpress.compress.cache import CacheConfig, cache_
from diffpress.eval import metrics
from diffpress.exporters.cpu import cpu_flags

sys.path.insert(0, str(Path(__file__).parent))
from ptq import setup

GUIDANCE = 3.0
SEARCH_SEED = 1000


def measure(den, ref, labels, clf, real_feats, steps: int, sampler: str) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    out = diffpress.sample(den, labels=labels, guidance=GUIDANCE, steps=steps, scheduler=sampler, seed=0,
                           progress=False).images
    feats, logits = metrics.classifier_outputs(clf, out)
    row = {"cond_accuracy": metrics.conditional_accuracy(logits, labels),
           "fd_real": metrics.frechet_distance(feats.numpy(), real_feats), "seconds": round(time.perf_counter() - t0, 1)}
    if ref is not None:
        row.update(psnr_db=metrics.psnr(ref, out), ssim=metrics.ssim(ref, out))
    return row, out


def digits(args) -> None:
    clf, real_feats, results = setup(samples=args.samples, search_samples=32, holdout=32, search_seed=SEARCH_SEED,
                                     time_budget=args.time_budget)
    results["settings"].update(scheduler="see samplers", samplers=args.samplers, cpu=cpu_flags(),
                               simulated="nothing: caching computes the same in PyTorch and in the export")
    den = diffpress.load(args.model)
    labels = torch.arange(args.samples) % 10
    res = results["models"].setdefault(args.model, {})
    out = args.out or Path(f"benchmarks/results/cache_{args.model}.json")
    for spec in args.samplers:
        sampler, steps = spec.split(":")
        steps = int(steps)
        full, ref = measure(den, None, labels, clf, real_feats, steps, sampler)
        rows = {"full": full}
        print(args.model, spec, "full", json.dumps(full), flush=True)
        for budget in args.budgets:
            common = {"steps": steps, "sampler": sampler, "guidance": GUIDANCE, "samples": 32, "holdout": 32, "seed": SEARCH_SEED}
            uni = den.copy()
            ru = cache_(uni, CacheConfig(budget=budget, search="uniform", **common), progress=False)
            srch = den.copy()
            rs = cache_(srch, CacheConfig(budget=ru.macs_fraction, search="search", time_budget=args.time_budget,
                                          **common), progress=False)
            row = {}
            for key, m, r in (("uniform", uni, ru), ("search", srch, rs)):
                q, _ = measure(m, ref, labels, clf, real_feats, steps, sampler)
                q.update(macs_fraction=r.macs_fraction, macs_reduction=1 / r.macs_fraction,
                         search_psnr_db=r.search_psnr, holdout_psnr_db=r.holdout_psnr, patterns=len(r.schedule.patterns()),
                         evaluations=r.evaluations, search_seconds=round(r.seconds, 1),
                         schedule=r.schedule.picture().splitlines())
                row[key] = q
            row["greedy_search_psnr_db"] = rs.candidates.get("greedy", {}).get("psnr")
            row["greedy_macs_fraction"] = rs.candidates.get("greedy", {}).get("macs_fraction")
            row["search_minus_uniform_db"] = row["search"]["psnr_db"] - row["uniform"]["psnr_db"]
            rows[f"budget_{budget}"] = row
            print(args.model, spec, budget, json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "schedule"}
                                                        if isinstance(v, dict) else v for k, v in row.items()}),
                  flush=True)
            res[spec] = rows
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))


def quant(args) -> None:
    from diffpress.compress import QuantizeConfig, quantize_

    clf, real_feats, results = setup(samples=args.samples, budget=args.budgets[0], time_budget=args.time_budget,
                                     simulated_quant="fake-quant in PyTorch")
    results["settings"]["cpu"] = cpu_flags()
    den = diffpress.load(args.model)
    labels = torch.arange(args.samples) % 10
    full, ref = measure(den, None, labels, clf, real_feats, 50, "ddim")
    cal = diffpress.calibrate(den, num_samples=64, steps=50, guidance=GUIDANCE, seed=SEARCH_SEED, progress=False)
    q = den.copy()
    quantize_(q, QuantizeConfig(bias_correction=True), cal, progress=False)
    rows = {"full": full}
    rows["w8a8"], _ = measure(q, ref, labels, clf, real_feats, 50, "ddim")
    budget = args.budgets[0]
    for refit in (False, True):
        m = q.copy()
        r = cache_(m, CacheConfig(budget=budget, search="search", time_budget=args.time_budget, steps=50,
                                  guidance=GUIDANCE, samples=32, holdout=32, seed=SEARCH_SEED,
                                  calibrate_quantizers=refit), cal, progress=False)
        row, _ = measure(m, ref, labels, clf, real_feats, 50, "ddim")
        row.update(macs_fraction=r.macs_fraction, search_psnr_db=r.search_psnr, holdout_psnr_db=r.holdout_psnr,
                   quantizers=r.quantizers)
        rows["w8a8_cache_refit" if refit else "w8a8_cache_uncached_ranges"] = row
        print(args.model, "refit" if refit else "no refit", json.dumps(row), flush=True)
        # the same schedule, ranges the other way: isolates the refit from the search's randomness
        if refit:
            other = q.copy()
            from diffpress.compress.cache import Schedule, install

            rec = m.compression[-1]
            install(other, Schedule.from_dict(rec["schedule"]), rec["modules"], rec["kinds"])
            row2, _ = measure(other, ref, labels, clf, real_feats, 50, "ddim")
            rows["same_schedule_uncached_ranges"] = row2
            print(args.model, "same schedule, no refit", json.dumps(row2), flush=True)
    results["models"][args.model] = rows
    out = args.out or Path(f"benchmarks/results/cache_quant_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


def onnx(args) -> None:
    from onnx_speed import random_model

    from diffpress import export_onnx
    from diffpress.compress import QuantizeConfig, quantize_
    from diffpress.deploy import loop_timer
    from diffpress.eval.cost import latency_side_by_side

    results = {"settings": {"sample_size": 16, "batch": 1, "steps": 50, "sampler": "ddim", "guidance": 1.0,
                            "threads": args.threads, "repeats": args.repeats, "interval": args.interval,
                            "cpu": cpu_flags(), "machine": platform.machine(), "torch": torch.__version__},
               "architectures": {}}
    out = args.out or Path("benchmarks/results/cache_onnx.json")
    work = Path(tempfile.mkdtemp(prefix="cache-onnx-"))
    try:
        for name in args.archs:
            den, cs = random_model(name, 16)
            q = den.copy()
            quantize_(q, QuantizeConfig(), cs, progress=False)
            models = {"fp32": den, "w8a8": q}
            for key in ("fp32", "w8a8"):
                c = models[key].copy()
                r = cache_(c, CacheConfig(search="uniform", interval=args.interval, holdout=0, steps=50, sampler="ddim",
                                          guidance=1.0, calibrate_quantizers=False), cs, progress=False)
                models[f"cached-{key}"] = c
                print(name, key, r.summary().splitlines()[0], flush=True)
            rows = {}
            for key, m in models.items():
                t0 = time.perf_counter()
                res = export_onnx(m, work / f"{name}-{key}", batch=1, opset=21, force=True, rtol=args.rtol)
                rows[key] = {"bytes": sum(f.stat().st_size for f in (work / f"{name}-{key}").iterdir()), "export_seconds": round(time.perf_counter() - t0),
                             "graphs": [g["name"] for g in res.spec["graphs"]],
                             "verification": {k: res.verification[k] for k in ("rel_rms_diff", "rtol", "passed")}}
                if key.startswith("cached"):
                    rows[key]["macs_fraction"] = m.compression[-1]["figures"]["macs_fraction"]
                print(name, key, json.dumps(rows[key]), flush=True)
            del models, den, q, c, m  # gigabytes each: free them before ONNX Runtime loads the graphs
            gc.collect()
            timers = {k: loop_timer(work / f"{name}-{k}", steps=50, threads=args.threads, sampler="ddim", guidance=1.0)
                      for k in rows}
            med = latency_side_by_side(timers, repeats=args.repeats, warmup=1)
            for k, row in rows.items():
                timing = timers[k].denoiser.timing  # one more run: its wall time against its time in ONNX Runtime
                timing.update(seconds=0.0, runs=0)
                t0 = time.perf_counter()
                timers[k]()
                wall = time.perf_counter() - t0
                row.update(ms=med[k] * 1e3, speedup_vs_fp32=med["fp32"] / med[k], ort_ms_per_run=timing["seconds"] * 1e3,
                           loop_overhead_ms_per_step=(wall - timing["seconds"]) * 1e3 / 50)
                print(name, k, json.dumps({kk: v for kk, v in row.items() if kk != "graphs"}), flush=True)
            results["architectures"][name] = rows
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            del timers
            gc.collect()
            for k in rows:
                shutil.rmtree(work / f"{name}-{k}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of ONNX files


def table(folder: Path) -> None:
    for path in sorted(folder.glob("cache_digits-*.json")):
        data = json.loads(path.read_text())
        for model, per in data["models"].items():
            print(f"\n{model} ({data['settings']['samples']} samples)\n")
            print("| sampler | budget | schedule | MACs | PSNR dB | SSIM | acc | FD | search / held-out PSNR |")
            print("|---|---|---|---|---|---|---|---|---|")
            for spec, rows in per.items():
                f = rows["full"]
                print(f"| {spec} | - | uncached | 100 % | - | - | {f['cond_accuracy']:.3f} | {f['fd_real']:.1f} | - |")
                for key, row in rows.items():
                    if not key.startswith("budget_"):
                        continue
                    for kind in ("uniform", "search"):
                        r = row[kind]
                        print(f"| {spec} | {key[7:]} | {kind} | {r['macs_fraction']:.1%} ({r['macs_reduction']:.2f}x) | "
                              f"{r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['cond_accuracy']:.3f} | {r['fd_real']:.1f} | "
                              f"{r['search_psnr_db']:.2f} / {r['holdout_psnr_db']:.2f} |")
    for path in sorted(folder.glob("cache_quant_*.json")):
        data = json.loads(path.read_text())
        for model, rows in data["models"].items():
            print(f"\n{model}: W8A8 + cache\n")
            for key, r in rows.items():
                print(f"- {key}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in r.items() if k != "quantizers"))
    path = folder / "cache_onnx.json"
    if path.is_file():
        data = json.loads(path.read_text())
        print(f"\nONNX Runtime, whole loop ({data['settings']})\n")
        print("| architecture | model | ms per run | vs fp32 | ORT ms | loop overhead ms/step | MB | rel RMS |")
        print("|---|---|---|---|---|---|---|---|")
        for arch, rows in data["architectures"].items():
            for k, r in rows.items():
                print(f"| {arch} | {k} | {r['ms']:.0f} | {r['speedup_vs_fp32']:.2f}x | {r['ort_ms_per_run']:.0f} | "
                      f"{r['loop_overhead_ms_per_step']:.2f} | {r['bytes'] / 1e6:.0f} | "
                      f"{r['verification']['rel_rms_diff']:.2g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cond-unet")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    parser.add_argument("--samplers", nargs="+", default=["ddim:50", "dpm++:20"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--time-budget", type=float, default=180.0)
    parser.add_argument("--quant", action="store_true")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--archs", nargs="+", default=["sd15-unet", "dit-xl-2"])
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1.0)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.table:
        table(Path("benchmarks/results"))
    elif args.onnx:
        onnx(args)
    elif args.quant:
        quant(args)
    else:
        digits(args)


if __name__ == "__main__":
    main()
