"""Quality of the full-precision zoo models: conditional accuracy and Fréchet distance to real digits.

    python benchmarks/zoo_quality.py [--samples 1000] [--steps 50] [--guidance 1 3 5] [--out benchmarks/results/zoo_quality.json]

For each zoo denoiser, samples with DDIM (50 steps by default) at each guidance scale (class-conditional
models; the unconditional one is sampled once), classifies the samples with the zoo digits classifier
and reports the fraction assigned to the requested class and the Fréchet distance (classifier
features) to all 1797 real digits. Noise floor: the FD between the two real splits (train vs test).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import diffpress
from diffpress.eval import metrics
from diffpress.zoo import DENOISERS, load_classifier
from diffpress.zoo.data import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--models", nargs="+", default=list(DENOISERS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_quality.json"))
    args = parser.parse_args()

    clf = load_classifier()
    real_all, _ = metrics.classifier_outputs(clf, load_digits("all")[0])
    f_train, _ = metrics.classifier_outputs(clf, load_digits("train")[0])
    f_test, _ = metrics.classifier_outputs(clf, load_digits("test")[0])
    results = {
        "settings": {"samples": args.samples, "steps": args.steps, "scheduler": "ddim", "seed": 0,
                     "torch": torch.__version__, "machine": platform.machine()},
        "noise_floor_fd_real_train_vs_test": metrics.frechet_distance(f_train.numpy(), f_test.numpy()),
        "models": {},
    }
    print(f"FD real train vs real test (noise floor): {results['noise_floor_fd_real_train_vs_test']:.3f}")
    for name in args.models:
        den = diffpress.load(name)
        rows = []
        for g in (args.guidance if den.cond_kind != "none" else [1.0]):
            kw = ({"labels": torch.arange(args.samples) % 10} if den.cond_kind != "none"
                  else {"num_samples": args.samples})
            t0 = time.perf_counter()
            out = diffpress.sample(den, steps=args.steps, guidance=g, seed=0, **kw)
            feats, logits = metrics.classifier_outputs(clf, out.images)
            row = {"guidance": g, "fd_real": metrics.frechet_distance(feats.numpy(), real_all.numpy()),
                   "seconds": round(time.perf_counter() - t0, 1)}
            if den.cond_kind != "none":
                row["cond_accuracy"] = metrics.conditional_accuracy(logits, out.labels)
            rows.append(row)
            print(name, json.dumps(row))
        results["models"][name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
