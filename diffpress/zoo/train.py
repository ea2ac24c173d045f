"""Train the reference digits models: ``python -m diffpress.zoo.train NAME [--steps N] [--out DIR]``.

Seeded and CPU-only. Denoisers are written as diffusers pipeline folders (``model_index.json``,
``unet/`` or ``transformer/``, ``scheduler/``, and ``conditioner/`` for label-to-token models) holding
EMA weights; the classifier as a single safetensors file.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from diffpress._io import atomic_dir
from diffpress.zoo import models
from diffpress.zoo.data import NUM_CLASSES, load_digits

WEIGHTS_DIR = Path(__file__).parent / "weights"
DENOISERS = {
    # name: (steps, learning rate)
    "digits-unet": (3000, 1e-3),
    "digits-cond-unet": (3000, 1e-3),
    "digits-dit": (5000, 1e-3),
}
CLASSIFIER = "digits-classifier"
CFG_DROP = 0.1
BATCH = 128


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def train_denoiser(name: str, out: Path, steps: int | None = None, seed: int = 0, force: bool = False) -> None:
    from diffusers.training_utils import EMAModel

    default_steps, lr = DENOISERS[name]
    steps = steps or default_steps
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits("all")
    conditioner = None
    if name == "digits-unet":
        model, key = models.digits_unet(), "unet"
    elif name == "digits-cond-unet":
        (model, conditioner), key = models.digits_cond_unet(), "unet"
    else:
        model, key = models.digits_dit(), "transformer"
    modules = [model] + ([conditioner] if conditioner is not None else [])
    params = [p for m in modules for p in m.parameters()]
    scheduler = models.training_scheduler()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, steps))
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)

    bar = tqdm(range(steps), desc=f"train {name}")
    for step in bar:
        idx = torch.randint(len(labels), (BATCH,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(BATCH, generator=gen) < CFG_DROP] = NUM_CLASSES  # null label for classifier-free guidance
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        if name == "digits-unet":
            pred = model(xt, t).sample
        elif name == "digits-cond-unet":
            pred = model(xt, t, encoder_hidden_states=conditioner(y)).sample
        else:
            pred = model(xt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)

    import diffusers

    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp / key)
        scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "DDPMPipeline" if name == "digits-unet" else "DiffpressLabelPipeline",
            "_diffusers_version": diffusers.__version__,
            key: ["diffusers", type(model).__name__],
            "scheduler": ["diffusers", type(scheduler).__name__],
        }
        if conditioner is not None:
            conditioner.save_pretrained(tmp / "conditioner")
            index["conditioner"] = ["diffpress", "LabelEmbedding"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(
            {"steps": steps, "lr": lr, "batch": BATCH, "seed": seed, "cfg_drop": CFG_DROP,
             "ema_decay": 0.999, "final_loss": loss.item()}, indent=2) + "\n")


def train_classifier(out: Path, epochs: int = 40, seed: int = 0, force: bool = False) -> float:
    """Train the metrics classifier on the train split (with 1-pixel shifts); return test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    clf = models.DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="train digits-classifier"):
        clf.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            x = x_train[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(clf(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x_test).argmax(1) == y_test).float().mean().item()
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        save_file(clf.state_dict(), tmp / "model.safetensors",
                  metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(epochs), "seed": str(seed)})
    return acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffpress.zoo.train",
        description="Train a reference digits model (seeded, CPU) and write it into the zoo.")
    parser.add_argument("name", choices=[*DENOISERS, CLASSIFIER])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (denoisers) or epochs (classifier)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {WEIGHTS_DIR}/NAME)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)
    out = args.out or WEIGHTS_DIR / args.name
    if args.name == CLASSIFIER:
        acc = train_classifier(out, epochs=args.steps or 40, seed=args.seed, force=args.force)
        print(f"digits-classifier test accuracy: {acc:.4f}")
    else:
        train_denoiser(args.name, out, steps=args.steps, seed=args.seed, force=args.force)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
