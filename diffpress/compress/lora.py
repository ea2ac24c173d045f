"""LoRA on a compressed model without requantizing: ``apply_lora(denoiser, path)``.

A LoRA adds ``B @ A`` to a layer's weight. On a layer the lowrank pass split into a quantized residual and a
float branch, the LoRA's factors are concatenated to the branch (SVDQuant / Nunchaku's way): the rank grows by
the LoRA's rank and the quantized residual is untouched. On a float layer the product is merged into the weight.
"""
from __future__ import annotations

import torch
from torch import nn

from diffpress.compress.lowrank import LowRankBranch, LowRankLayer
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError

_PREFIXES = ("base_model.model.", "unet.", "transformer.", "model.")


def apply_lora(denoiser: Denoiser, path, scale: float = 1.0) -> list[str]:
    """Add a LoRA (safetensors, diffusers / PEFT keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, or
    ``<module>.lora.down.weight`` / ``.lora.up.weight``) to ``denoiser`` without requantizing anything.

    On a low-rank-absorbed layer the LoRA joins the float branch (its rank grows by the LoRA's rank;
    ``down`` takes ``A * s`` since the branch reads the smoothed input ``x / s``); on a float layer it is
    merged into the weight. A quantized layer without a branch cannot take it (that would need a new
    quantization) and raises. Returns the names of the layers changed.

    >>> import diffpress, torch, tempfile, os
    >>> from safetensors.torch import save_file
    >>> den = diffpress.load("digits-dit")
    >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
    >>> save_file({"transformer_blocks.0.ff.net.2.lora_A.weight": torch.zeros(2, 256),
    ...            "transformer_blocks.0.ff.net.2.lora_B.weight": torch.zeros(64, 2)}, path)
    >>> from diffpress.compress.lora import apply_lora
    >>> apply_lora(den, path)
    ['model.transformer_blocks.0.ff.net.2']
    """
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise DiffpressError(f"cannot read the LoRA file {path}: {exc}") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for a, b in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"),
                     (".lora.up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(a):
                pairs.setdefault(key[: -len(a)], {})[b] = value
    if not pairs:
        raise DiffpressError(f"{path}: no LoRA tensors (expected keys '<module>.lora_A.weight' / '.lora_B.weight')")
    names = dict(denoiser.named_modules())
    record = next((r for r in denoiser.compression if r["pass"] == "lowrank"), None)
    changed = []
    for key, ab in pairs.items():
        if "A" not in ab or "B" not in ab:
            raise DiffpressError(f"{path}: {key} has only one of lora_A / lora_B")
        target = _module_for(key, names)
        if target is None:
            raise DiffpressError(f"{path}: {key} names no layer of this model")
        module = names[target]
        a, b = ab["A"].float(), ab["B"].float()
        factor = scale * (float(ab["alpha"]) / a.shape[0] if "alpha" in ab else 1.0)
        if isinstance(module, LowRankLayer):
            _join_branch(module, a, b * factor)
            if record is not None:
                next(layer for layer in record["layers"] if layer["name"] == target)["rank"] = module.rank
        elif type(module) in (nn.Linear, nn.Conv2d):
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(module.weight.shape)
            module.weight.data += factor * delta.to(module.weight.dtype)
        else:
            raise DiffpressError(f"{target} is a {type(module).__name__}: a LoRA joins the float branch of a lowrank "
                                 "layer or a float layer's weight; this layer is quantized without a branch (apply the "
                                 "LoRA before quantizing, or use a lowrank recipe)")
        changed.append(target)
    return changed


def _module_for(key: str, names: dict[str, nn.Module]) -> str | None:
    for prefix in ("", *_PREFIXES):
        if prefix and not key.startswith(prefix):
            continue
        name = "model." + key[len(prefix):]
        if name in names:
            return name
    return None


def _join_branch(layer: LowRankLayer, a: torch.Tensor, b: torch.Tensor) -> None:
    """Concatenate LoRA factors to the branch: ``down`` gains ``A`` scaled by ``s`` per input channel."""
    s = 1 / layer.inv_smooth
    shape = [1, -1] + [1] * (a.dim() - 2)
    a = a * s.view(shape)
    if layer.branch is None:
        proto = layer.residual
        layer.branch = LowRankBranch(proto, 0, torch.float32)
    br = layer.branch
    dtype = br.down.dtype
    br.down = nn.Parameter(torch.cat([br.down.float(), a.reshape(a.shape[0], *br.down.shape[1:])]).to(dtype))
    br.up = nn.Parameter(torch.cat([br.up.float(), b.reshape(b.shape[0], b.shape[1], *br.up.shape[2:])], 1).to(dtype))
