"""Denoiser: one calling convention, ``denoiser(x_t, t, cond=None) -> prediction``, over every model kind.

Supported: diffusers ``UNet2DModel`` (cond: optional class labels), ``UNet2DConditionModel`` (cond:
encoder hidden states), ``DiTTransformer2DModel`` (cond: class labels), ``PixArtTransformer2DModel``
(cond: text encoder states), and any ``nn.Module`` whose forward is ``(x, t, cond)``.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext

# diffusers class name -> (kind, conditioning kind)
SUPPORTED: dict[str, tuple[str, str]] = {
    "UNet2DModel": ("unet2d", "none"),
    "UNet2DConditionModel": ("unet2d_condition", "hidden_states"),
    "DiTTransformer2DModel": ("dit", "class"),
    "PixArtTransformer2DModel": ("pixart", "hidden_states"),
}
COND_KINDS = ("none", "class", "hidden_states")
# /2: low-bit integer buffers packed in compressed.safetensors (its metadata says which); /1 still loads
COMPRESSED_FORMAT = "diffpress.compressed/2"
COMPRESSED_FORMATS = ("diffpress.compressed/1", COMPRESSED_FORMAT)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _scheduler_config(scheduler: Any) -> dict | None:
    """A scheduler object or config dict -> a config dict that names its class."""
    if scheduler is None:
        return None
    import diffusers

    if isinstance(scheduler, diffusers.SchedulerMixin):
        return dict(scheduler.config, _class_name=type(scheduler).__name__)
    config = dict(scheduler)
    if "_class_name" not in config:
        raise DiffpressError("scheduler_config has no _class_name; pass the scheduler object itself "
                             "(scheduler_config=DDIMScheduler(...)) or a config saved by diffusers")
    return config


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and give each its own training flag back afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _supported_text() -> str:
    return ", ".join(SUPPORTED) + ", or any nn.Module with forward(x, t, cond)"


class Denoiser(nn.Module):
    """A denoiser with one calling convention and the facts the passes need.

    ``prediction_type`` is what the model predicts (``epsilon``, ``v_prediction`` or ``sample``),
    ``sample_shape`` the ``(C, H, W)`` of ``x_t``, ``cond_kind`` one of ``none``, ``class`` (integer
    labels) or ``hidden_states`` (``(B, tokens, dim)``). A ``conditioner`` (labels -> hidden states)
    lets a hidden-states model be driven by class labels, with a null label for guidance.

    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
    ...                    norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
    ...                    up_block_types=("UpBlock2D",) * 2)
    >>> den = Denoiser(unet)
    >>> den(torch.zeros(2, 1, 8, 8), torch.tensor(10)).shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prediction_type: str | None = None,
        sample_shape: tuple[int, int, int] | None = None,
        cond_kind: str | None = None,
        cond_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        conditioner: nn.Module | None = None,
        scheduler_config: Any = None,
    ):
        super().__init__()
        self.model = model
        self.conditioner = conditioner
        # where the denoiser is in a sampling run: set by the sampler and forward, read by modules passes install
        self.runtime = RunContext()
        self.compression: list[dict[str, Any]] = []  # one record per applied pass, enough to rebuild the modules
        name = type(model).__name__
        config = getattr(model, "config", None)
        if name in SUPPORTED and config is not None:
            self.kind, default_cond = SUPPORTED[name]
        else:
            self.kind, default_cond = "module", "none"
        self.scheduler_config = _scheduler_config(scheduler_config)
        self.prediction_type = (prediction_type
                                or (self.scheduler_config or {}).get("prediction_type") or "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise DiffpressError(f"unknown prediction_type {self.prediction_type!r}; allowed: {PREDICTION_TYPES}")

        if self.kind == "module":
            if sample_shape is None:
                raise DiffpressError(
                    f"{name} is not a diffusers model, so diffpress cannot read its input shape; "
                    "pass sample_shape=(C, H, W) (and cond_kind / cond_shape if it is conditional)")
            self.sample_shape = tuple(sample_shape)
        else:
            side = config.sample_size
            if sample_shape is not None:
                self.sample_shape = tuple(sample_shape)
            elif side is None:
                raise DiffpressError(f"{name} has no sample_size in its config; pass sample_shape=(C, H, W)")
            else:
                h, w = (side, side) if isinstance(side, int) else tuple(side)
                self.sample_shape = (config.in_channels, h, w)

        if len(self.sample_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in self.sample_shape):
            raise DiffpressError(f"sample shape {self.sample_shape} is not three positive integers (C, H, W); "
                                 "check sample_size / in_channels in the model's config.json, or pass sample_shape")
        if self.kind == "unet2d" and getattr(config, "num_class_embeds", None):
            default_cond = "class"
        self.cond_kind = cond_kind or ("hidden_states" if conditioner is not None else default_cond)
        if self.cond_kind not in COND_KINDS:
            raise DiffpressError(f"unknown cond_kind {self.cond_kind!r}; allowed: {COND_KINDS}")

        # null_label: the label index that means "no condition" (classifier-free guidance), if the model has one
        self.num_classes, self.null_label = num_classes, None
        if conditioner is not None:
            self.num_classes = num_classes or conditioner.config.num_classes
            self.null_label = conditioner.null_label
        elif self.kind == "dit":  # diffusers DiT keeps a CFG embedding at index num_embeds_ada_norm
            self.num_classes = num_classes or config.num_embeds_ada_norm
            self.null_label = config.num_embeds_ada_norm
        elif self.kind == "unet2d" and self.cond_kind == "class":
            # a class-embedding UNet has a null class only if it was trained with one: say so via num_classes
            if num_classes is not None and num_classes < config.num_class_embeds:
                self.null_label = num_classes
            self.num_classes = num_classes or config.num_class_embeds
        elif self.kind == "module" and self.cond_kind == "class" and num_classes is not None:
            self.null_label = num_classes  # a plain module's declared convention: label num_classes = no label
        self.cond_shape = tuple(cond_shape) if cond_shape else self._default_cond_shape()
        # diffusers DiT/PixArt with learned sigma return 2*C channels; the prediction is the first C
        out_channels = getattr(config, "out_channels", None) if config is not None else None
        self._split_sigma = bool(out_channels and out_channels == 2 * self.sample_shape[0])

    def _default_cond_shape(self) -> tuple[int, ...]:
        if self.cond_kind == "none":
            return ()
        if self.cond_kind == "class":
            return ()
        if self.conditioner is not None:
            c = self.conditioner.config
            return (c.num_tokens, c.dim)
        config = getattr(self.model, "config", None)
        if self.kind == "unet2d_condition":
            return (77, config.cross_attention_dim)
        if self.kind == "pixart":
            return (120, config.caption_channels or config.cross_attention_dim)
        raise DiffpressError("cond_kind='hidden_states' needs cond_shape=(tokens, dim)")

    # -- calling convention ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.sample_shape[0]:
            raise DiffpressError(
                f"x_t has shape {tuple(x.shape)}; this denoiser takes (B, {self.sample_shape[0]}, H, W)")
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        if t.numel() == 1:
            t = t.reshape(()).expand(x.shape[0])
        if self.cond_kind != "none" and cond is None:
            raise DiffpressError(f"this denoiser is conditional ({self.cond_kind}); pass cond")
        self.runtime.t = t
        m = self.model
        if self.kind == "unet2d":
            out = m(x, t, class_labels=cond if self.cond_kind == "class" else None).sample
        elif self.kind == "unet2d_condition":
            out = m(x, t, encoder_hidden_states=cond).sample
        elif self.kind == "dit":
            out = m(x, timestep=t, class_labels=cond).sample
        elif self.kind == "pixart":
            extra = {"resolution": None, "aspect_ratio": None}
            if m.config.use_additional_conditions:  # sizes in pixels, assuming an 8x VAE
                b, _, h, w = x.shape
                extra = {"resolution": torch.tensor([[h * 8.0, w * 8.0]]).expand(b, 2),
                         "aspect_ratio": torch.tensor([[h / w]]).expand(b, 1)}
            out = m(x, encoder_hidden_states=cond, timestep=t, added_cond_kwargs=extra).sample
        else:
            out = m(x, t, cond)
            if hasattr(out, "sample"):
                out = out.sample
            elif isinstance(out, (tuple, list)):
                out = out[0]
        if self._split_sigma:
            out = out[:, : self.sample_shape[0]]
        return out

    # -- conditioning helpers ------------------------------------------------------------------
    @property
    def supports_guidance(self) -> bool:
        """True when there is a null condition for classifier-free guidance."""
        return self.null_label is not None or self.cond_kind == "hidden_states"

    @property
    def default_guidance(self) -> float:
        """3.0 for a conditional model with a null condition, else 1.0 (no guidance)."""
        return 3.0 if self.supports_guidance and self.cond_kind != "none" else 1.0

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels -> the ``cond`` this denoiser takes (labels themselves, or conditioner tokens)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if self.num_classes and labels.numel():
            bad = [v for v in labels.reshape(-1).tolist() if not (0 <= v < self.num_classes or v == self.null_label)]
            if bad:
                raise DiffpressError(f"label {bad[0]} is out of range: this model has classes 0..{self.num_classes - 1}"
                                     + (f" (and the null label {self.null_label})" if self.null_label is not None
                                        else ""))
        if self.conditioner is not None:
            with torch.no_grad():
                return self.conditioner(labels)
        if self.cond_kind == "class":
            return labels
        raise DiffpressError(
            f"this denoiser ({self.kind}, cond {self.cond_kind}) has no label conditioner; pass cond directly")

    def null_cond(self, batch: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The unconditional ``cond`` for classifier-free guidance: the null label, or zero states shaped
        ``like`` the conditional ones (the empty-prompt convention for text models without an encoder)."""
        if self.null_label is not None:
            return self.encode_labels(torch.full((batch,), self.null_label, dtype=torch.long))
        if self.cond_kind == "hidden_states":
            return torch.zeros_like(like) if like is not None else torch.zeros(batch, *self.cond_shape)
        raise DiffpressError(
            "this denoiser has no null condition, so classifier-free guidance is impossible; use guidance=1, "
            "or pass num_classes=N if label N is the null class the model was trained with")

    def example_inputs(self, batch: int = 1, sample_shape: tuple[int, int, int] | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Random ``(x_t, t, cond)`` of the right shapes and dtypes, for capture, export and timing."""
        if self.cond_kind == "class" and not self.num_classes:
            raise DiffpressError("class-conditional denoiser without num_classes; pass num_classes=N")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *(sample_shape or self.sample_shape), generator=g)
        t = torch.full((batch,), 500, dtype=torch.long)
        if self.cond_kind == "none":
            cond = None
        elif self.cond_kind == "class" or self.conditioner is not None:
            cond = self.encode_labels(torch.randint(0, self.num_classes or 1, (batch,), generator=g))
        else:
            cond = torch.randn(batch, *self.cond_shape, generator=g)
        return x, t, cond

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, force: bool = False) -> Path:
        """Write a pipeline folder (``model_index.json``, model, scheduler, conditioner) that ``load`` reads.

        A compressed denoiser is written as its architecture config, ``compressed.safetensors`` (its whole
        state: integer weights, scales) and ``diffpress.json`` (the passes and per-layer settings), so
        ``load`` rebuilds it without recalibrating. Writes atomically; an existing ``path`` needs ``force=True``.
        """
        import diffusers

        from diffpress._io import _umask, atomic_dir

        if self.kind == "module":
            raise DiffpressError(
                f"{type(self.model).__name__} is a plain nn.Module; save its state_dict yourself "
                "(diffpress saves diffusers models only)")
        key = "transformer" if self.kind in ("dit", "pixart") else "unet"
        with atomic_dir(path, force=force) as tmp:
            if self.compression:
                from safetensors.torch import save_file

                self.model.save_config(tmp / key)
                state, packed = self.packed_state()
                save_file(state, str(tmp / "compressed.safetensors"), metadata={"packed": json.dumps(packed)})
                (tmp / "compressed.safetensors").chmod(0o666 & ~_umask())  # safetensors writes 0600
                (tmp / "diffpress.json").write_text(json.dumps(
                    {"format": COMPRESSED_FORMAT, "passes": self.compression}, indent=2) + "\n")
            else:
                self.model.save_pretrained(tmp / key)
            index: dict[str, Any] = {"_class_name": "DiffpressPipeline", "_diffusers_version": diffusers.__version__,
                                     key: ["diffusers", type(self.model).__name__]}
            if self.scheduler_config is not None:
                cls = self.scheduler_config["_class_name"]
                sched = getattr(diffusers, cls).from_config(self.scheduler_config)
                sched.save_pretrained(tmp / "scheduler")
                index["scheduler"] = ["diffusers", cls]
            if self.conditioner is not None:
                if self.compression:  # its weights are in compressed.safetensors
                    self.conditioner.save_config(tmp / "conditioner")
                else:
                    self.conditioner.save_pretrained(tmp / "conditioner")
                index["conditioner"] = ["diffpress", type(self.conditioner).__name__]
            index["diffpress"] = {"prediction_type": self.prediction_type}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return Path(path)

    def packed_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        """The state dict as saved: buffers that modules declare low-bit (``packed_buffers()``, e.g. int4
        weights held in int8) packed two values per byte; and ``{key: {bits, shape}}`` to unpack them."""
        from diffpress._io import pack_int

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        packed: dict[str, dict[str, Any]] = {}
        for name, module in self.named_modules():
            for buffer, bits in getattr(module, "packed_buffers", dict)().items():
                key = f"{name}.{buffer}" if name else buffer
                packed[key] = {"bits": bits, "shape": list(state[key].shape)}
                state[key] = pack_int(state[key], bits)
        return state, packed

    def copy(self) -> "Denoiser":
        """A deep copy (the passes rewrite modules in place; keep the original for evaluation)."""
        return copy.deepcopy(self)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, prediction_type={self.prediction_type}, sample_shape={self.sample_shape}, "
                f"cond_kind={self.cond_kind}")
