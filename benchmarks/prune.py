"""Structural pruning on the digits models, against Torch-Pruning, and ONNX Runtime speed on real-size architectures.

    python benchmarks/prune.py --model digits-cond-unet [--targets 0.3 0.5] [--samples 200] [--budget 600]
                               [--peer] [--out benchmarks/results/prune_digits-cond-unet.json]
    python benchmarks/prune.py --onnx [--archs sd15-unet dit-xl-2] [--target 0.4] [--repeats 10]
                               [--out benchmarks/results/prune_onnx.json]
    python benchmarks/prune.py --table

Digits (50-step DDIM, guidance 3, seeds 0.., ``--samples`` images, labels 0..9 repeated; calibration: 64
trajectories from seeds 1000.. of the full model): for each MAC target, diffpress ``prune`` with each importance
(magnitude, taylor, diff_pruning), then recovery of the diff_pruning model (distillation on the calibration
trajectories) measured at 2, 5 and 10 minutes of one run (the best held-out state at each time), and with
``--peer`` Torch-Pruning's magnitude pruner (``MagnitudePruner``, L2 importance, ``round_to=8``) at the same MACs
(its pruning ratio bisected until the MACs match), followed by the same recovery. Attention projections and the
output layer are in Torch-Pruning's ``ignored_layers`` (it cannot update diffusers' head counts; the user would do
the same), so it prunes convolution and feed-forward channels. PSNR / SSIM against the unpruned model's samples on
the same seeds; FD against all real digits.

ONNX (``--onnx``): random-weight real-size architectures at latent 16, batch 1, one thread: fp32 and W8A8, unpruned
and pruned by ``--target`` of the MACs (magnitude importance: the speed does not depend on which units go), exported
and verified, then timed side by side (median of interleaved repeats).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffpress
from diffpress.compress.prune import PruneConfig, prune_
from diffpress.compress.recover import RecoverConfig, recover
from diffpress.exporters.cpu import cpu_flags
from diffpress.graph import capture

sys.path.insert(0, str(Path(__file__).parent))
from ptq import measure, setup

CHECKPOINTS = (120.0, 300.0)


def size(den) -> dict:
    return {"params": sum(p.numel() for p in den.parameters()), "macs": capture(den, batch=1).macs}


def tp_prune(den, target: float, importance: str = "magnitude", calibration=None) -> tuple[object, float]:
    """Torch-Pruning at the ratio that removes ``target`` of the MACs (bisection): ``magnitude`` (L2) or
    ``taylor`` (``|w * dL/dw|``, the gradients of diffpress's own importance loss over the ``calibration`` points:
    the denoising loss at each point's x0 estimate, renoised, so both tools score on one signal)."""
    import torch_pruning as tp
    from torch import nn

    from diffpress.graph.roles import layer_roles  # noqa: F401  (roles name the output layer)

    base = capture(den, batch=1).macs
    last = {layer.name for layer in capture(den, batch=1).layers if "last" in layer.roles}

    def run(ratio: float):
        m = den.copy()
        attn = {name for name, mod in m.named_modules() if type(mod).__name__ == "Attention"}
        ignored = [mod for name, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d)) and
                   (name in last or any(name.startswith(a + ".") for a in attn))]
        imp = (tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2))
        pruner = tp.pruner.MetaPruner(m, example_inputs=tuple(m.example_inputs(2)), importance=imp,
                                      pruning_ratio=ratio, ignored_layers=ignored, round_to=8)
        if importance == "taylor":
            taylor_gradients(m, calibration)
        pruner.step()
        for mod in m.modules():  # diffusers' samplers assert their channel count (Diff-Pruning patches it too)
            if hasattr(mod, "channels") and hasattr(mod, "conv") and hasattr(mod.conv, "in_channels"):
                mod.channels = mod.conv.in_channels
        return m, 1 - capture(m, batch=1).macs / base

    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m, cut = run(mid)
        if best is None or abs(cut - target) < abs(best[1] - target):
            best = (m, cut)
        if abs(cut - target) < 0.005:
            break
        lo, hi = (mid, hi) if cut < target else (lo, mid)
    return best


def taylor_gradients(den, calibration, points: int = 64, seed: int = 0) -> None:
    """Accumulate ``.grad`` of the denoising loss over ``points`` calibration points (what TaylorImportance reads)."""
    from diffpress.compress.prune import _noised, _points, _x0

    gen = torch.Generator().manual_seed(seed + 1)
    den.zero_grad(set_to_none=True)
    den.eval()
    idx = _points(calibration, points, seed)
    for lo in range(0, len(idx), 16):
        x, t, cond = calibration.rows(idx[lo:lo + 16])
        with torch.no_grad():
            x0 = _x0(den, x, t, den(x, t, cond))
        xt, target = _noised(den, x0, t, torch.randn(x0.shape, generator=gen))
        (torch.nn.functional.mse_loss(den(xt, t, cond), target, reduction="sum") / len(idx)).backward()


def with_recovery(rows: dict, key: str, student, teacher, cal, budget: float, ctx) -> None:
    log = recover(student, teacher, cal, RecoverConfig(time_budget=budget), progress=False,
                  checkpoints=CHECKPOINTS)
    final = {k: v.clone() for k, v in student.state_dict().items()}
    for when in (*CHECKPOINTS, budget):
        if when > budget:
            continue
        student.load_state_dict(log["states"][when] if when < budget else final)
        steps = max([k for sec, k, _ in log["history"] if sec <= when] or [0]) if when < budget else log["steps"]
        rows[f"{key}+recover{int(when)}s"] = {**ctx["measure"](student), "recovery_steps": steps}
        print(key, when, json.dumps(rows[f"{key}+recover{int(when)}s"]), flush=True)
        ctx["save"]()


def digits(args) -> None:
    clf, real_feats, results = setup(samples=args.samples, calib_samples=64, calib_seed=1000,
                                     recovery_budget_s=args.budget, cpu=cpu_flags(),
                                     threads=torch.get_num_threads())
    results["settings"]["simulated"] = ""
    labels = torch.arange(args.samples) % 10
    den = diffpress.load(args.model)
    ref_row, ref = measure(den, None, labels, clf, real_feats)
    rows = {"full": {**ref_row, **size(den)}}
    results["models"][args.model] = rows

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    def meas(m) -> dict:
        return {**measure(m, ref, labels, clf, real_feats)[0], **size(m)}

    ctx = {"measure": meas, "save": save}
    save()
    cal = diffpress.calibrate(den, num_samples=64, steps=50, guidance=3.0, seed=1000, progress=False)
    for target in args.targets:
        pruned = {}
        for imp in ("magnitude", "taylor", "diff_pruning"):
            m = den.copy()
            t0 = time.perf_counter()
            rep = prune_(m, PruneConfig(target=target, importance=imp), cal, progress=False)
            key = f"prune{int(target * 100)}-{imp}"
            rows[key] = {**meas(m), "pass_seconds": round(time.perf_counter() - t0, 1),
                         "units_removed": rep.units_removed}
            print(key, json.dumps(rows[key]), flush=True)
            pruned[imp] = m
            save()
        with_recovery(rows, f"prune{int(target * 100)}-diff_pruning", pruned["diff_pruning"], den, cal, args.budget,
                      ctx)
        if args.peer:
            key = f"torch-pruning{int(target * 100)}-magnitude"
            try:
                import torch_pruning

                results["settings"]["torch_pruning"] = torch_pruning.__version__
                t0 = time.perf_counter()
                m, cut = tp_prune(den, target)
                rows[key] = {**meas(m), "pass_seconds": round(time.perf_counter() - t0, 1), "macs_cut": cut}
                print(key, json.dumps(rows[key]), flush=True)
                save()
                with_recovery(rows, key, m, den, cal, args.budget, ctx)
            except Exception as exc:  # noqa: BLE001 - the peer's failure is a row, not a crash
                rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(key, rows[key], flush=True)
                save()


def onnx(args) -> None:
    from onnx_speed import folder_bytes, interleaved_medians, random_model

    from diffpress import export_onnx
    from diffpress.compress import QuantizeConfig, quantize_
    from diffpress.exporters.onnx import example_feed, ort_session

    results = {"settings": {"target": args.target, "sample_size": 16, "batch": 1, "threads": args.threads,
                            "repeats": args.repeats, "cpu": cpu_flags(), "machine": platform.machine(),
                            "torch": torch.__version__}, "architectures": {}}
    work = Path(tempfile.mkdtemp(prefix="prune-onnx-"))
    for name in args.archs:
        den, cs = random_model(name, 16)
        rows, sessions = {}, {}
        small = den.copy()
        t0 = time.perf_counter()
        rep = prune_(small, PruneConfig(target=args.target, importance="magnitude"), progress=False)
        prune_s = time.perf_counter() - t0
        for key, base in (("fp32", den), (f"pruned{int(args.target * 100)}", small)):
            for q in (False, True):
                k = key + ("-w8a8" if q else "")
                m = base
                if q:
                    m = base.copy()
                    quantize_(m, QuantizeConfig(), cs, progress=False)
                res = export_onnx(m, work / f"{name}-{k}", batch=1, opset=21, force=True, rtol=args.rtol)
                rows[k] = {"bytes": folder_bytes(work / f"{name}-{k}"), "macs": capture(base, batch=1).macs,
                           "verification": {kk: res.verification[kk] for kk in ("rel_rms_diff", "rtol", "passed")}}
                print(name, k, json.dumps(rows[k]), flush=True)
                sessions[k] = ort_session(work / f"{name}-{k}" / "model.onnx", threads=args.threads)
        feeds = example_feed(den, 1, seed=5)
        inputs = {k: {i.name: a.numpy() for i, a in zip(s.get_inputs(), feeds)} for k, s in sessions.items()}
        med = interleaved_medians(sessions, inputs, args.repeats, warmup=2)
        for k, row in rows.items():
            row.update(ms=med[k], speedup_vs_fp32=med["fp32"] / med[k])
        results["architectures"][name] = {"prune_seconds": round(prune_s, 1), "prune": rep.summary(), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        del den, small, sessions
    shutil.rmtree(work, ignore_errors=True)  # gigabytes of ONNX files


def table(folder: Path) -> None:
    """Markdown tables from the JSON files this script wrote."""
    print("| model | row | MACs (M) | params (M) | PSNR dB | SSIM | acc | FD |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("prune*_digits-*.json")):
        data = json.loads(path.read_text())
        for model, rows in data["models"].items():
            for key, r in rows.items():
                if key == "full" and not path.name.startswith("prune_"):
                    continue
                if "error" in r:
                    print(f"| {model} | {key} | error: {r['error'][:80]} |||||||")
                    continue
                print(f"| {model} | {key} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | "
                      f"{r.get('psnr_db', float('nan')):.2f} | {r.get('ssim', float('nan')):.3f} | "
                      f"{r['cond_accuracy']:.3f} | {r['fd_real']:.1f} |")
    path = folder / "prune_onnx.json"
    if path.exists():
        data = json.loads(path.read_text())
        print("\n| architecture | row | ms | vs fp32 | MB | MACs (G) | verified (rel. RMS) |")
        print("|---|---|---|---|---|---|---|")
        for arch, a in data["architectures"].items():
            for key, r in a["rows"].items():
                print(f"| {arch} | {key} | {r['ms']:.0f} | {r['speedup_vs_fp32']:.2f}x | {r['bytes'] / 1e6:.0f} | "
                      f"{r['macs'] / 1e9:.2f} | {r['verification']['rel_rms_diff']:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cond-unet")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--budget", type=float, default=600.0, help="recovery seconds (measured at 120, 300 too)")
    parser.add_argument("--peer", action="store_true", help='also Torch-Pruning (pip install ".[peers]")')
    parser.add_argument("--onnx", action="store_true", help="ONNX Runtime latency on real-size architectures")
    parser.add_argument("--archs", nargs="+", default=["sd15-unet", "dit-xl-2"])
    parser.add_argument("--target", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print markdown tables from benchmarks/results")
    args = parser.parse_args()
    if args.table:
        return table(Path("benchmarks/results"))
    if args.out is None:
        args.out = Path("benchmarks/results") / ("prune_onnx.json" if args.onnx else f"prune_{args.model}.json")
    onnx(args) if args.onnx else digits(args)


if __name__ == "__main__":
    main()
