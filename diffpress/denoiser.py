"""Denoiser: one calling convention, ``denoiser(x_t, t, cond=None) -> prediction``, over every model family.

How each family is called lives in its adapter (:mod:`diffpress.adapters`): diffusers UNet2DModel,
UNet2DConditionModel (SD, SDXL), DiT, PixArt, SD3, Flux, Sana, AuraFlow, HunyuanDiT, and any ``nn.Module``
whose forward is ``(x, t, cond)``. ``cond`` is one tensor (class labels, or text hidden states) or, for
families with several conditioning inputs (SDXL, SD3, Flux, HunyuanDiT), a dict of them.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from diffpress.adapters.base import Part
from diffpress.errors import DiffpressError
from diffpress.runtime import RunContext

COND_KINDS = ("none", "class", "hidden_states")
# /2: low-bit integer buffers packed in compressed.safetensors (its metadata says which); /1 still loads
COMPRESSED_FORMAT = "diffpress.compressed/2"
COMPRESSED_FORMATS = ("diffpress.compressed/1", COMPRESSED_FORMAT)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # flow: the velocity of rectified flow


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


class Denoiser(nn.Module):
    """A denoiser with one calling convention and the facts the passes need.

    ``prediction_type`` is what the model predicts (``epsilon``, ``v_prediction``, ``sample``, or ``flow``
    for rectified-flow velocity), ``sample_shape`` the ``(C, H, W)`` of ``x_t``, ``cond_kind`` one of
    ``none``, ``class`` (integer labels) or ``hidden_states`` (text states, with ``parts`` naming each
    conditioning input: one tensor, or a dict of them for SDXL / SD3 / Flux / HunyuanDiT). The family's
    adapter (``adapter``) does the calling. A ``conditioner`` (labels -> hidden states) lets a hidden-states
    model be driven by class labels, with a null label for guidance.

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
        from diffpress.adapters import for_model

        self.adapter = for_model(model)
        self.kind = self.adapter.name
        name = type(model).__name__
        config = getattr(model, "config", None)
        self.scheduler_config = _scheduler_config(scheduler_config)
        self.prediction_type = (prediction_type or (self.scheduler_config or {}).get("prediction_type")
                                or self.adapter.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise DiffpressError(f"unknown prediction_type {self.prediction_type!r}; allowed: {PREDICTION_TYPES}")
        if (self.prediction_type == "flow") != (self.adapter.prediction_type == "flow") and self.kind != "module":
            family = "a flow-matching" if self.adapter.prediction_type == "flow" else "a Gaussian-diffusion"
            raise DiffpressError(f"{name} is {family} model; prediction_type {self.prediction_type!r} does not fit it")

        shape = sample_shape or self.adapter.sample_shape(model)
        if shape is None:
            raise DiffpressError(
                f"{name} {'is not a diffusers model' if self.kind == 'module' else 'has no sample_size in its config'}"
                ", so diffpress cannot read its input shape; pass sample_shape=(C, H, W)"
                + (" (and cond_kind / cond_shape if it is conditional)" if self.kind == "module" else ""))
        self.sample_shape = tuple(shape)
        if len(self.sample_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in self.sample_shape):
            raise DiffpressError(f"sample shape {self.sample_shape} is not three positive integers (C, H, W); "
                                 "check sample_size / in_channels in the model's config.json, or pass sample_shape")

        # the conditioning inputs by name: the family's (adapter), a conditioner's states, or the user's declaration
        self.num_classes, self.null_label = self.adapter.labels(model) if self.kind != "module" else (None, None)
        if conditioner is not None:
            c = conditioner.config
            self.parts = {"encoder_hidden_states": Part(tuple(cond_shape or (c.num_tokens, c.dim)))}
            self.num_classes, self.null_label = num_classes or c.num_classes, conditioner.null_label
        elif cond_kind is not None or cond_shape is not None:
            self.parts = self._declared_parts(cond_kind or "hidden_states", cond_shape)
        else:
            self.parts = self.adapter.parts(model, self.sample_shape)
        if num_classes is not None and conditioner is None:
            if self.kind == "unet2d" and self.num_classes and num_classes < self.num_classes:
                self.null_label = num_classes  # a class-embedding UNet trained with a null class says so via num_classes
            elif self.kind == "module":
                self.null_label = num_classes  # a plain module's declared convention: label num_classes = no label
            self.num_classes = num_classes
        labels = [p for p in self.parts.values() if p.null == "label"]
        self.cond_kind = "none" if not self.parts else ("class" if labels and conditioner is None else "hidden_states")
        if self.cond_kind not in COND_KINDS:
            raise DiffpressError(f"unknown cond_kind {self.cond_kind!r}; allowed: {COND_KINDS}")
        # diffusers DiT/PixArt/HunyuanDiT with learned sigma return 2*C channels; the prediction is the first C
        out_channels = getattr(config, "out_channels", None) if config is not None else None
        self._split_sigma = bool(out_channels and out_channels == 2 * self.sample_shape[0]
                                 or getattr(config, "learn_sigma", False))

    @staticmethod
    def _declared_parts(cond_kind: str, cond_shape) -> dict[str, Part]:
        if cond_kind not in COND_KINDS:
            raise DiffpressError(f"unknown cond_kind {cond_kind!r}; allowed: {COND_KINDS}")
        if cond_kind == "none":
            return {}
        if cond_kind == "class":
            return {"class_labels": Part((), torch.long, null="label")}
        if isinstance(cond_shape, dict):
            return {k: v if isinstance(v, Part) else Part(tuple(v)) for k, v in cond_shape.items()}
        if not cond_shape:
            raise DiffpressError("cond_kind='hidden_states' needs cond_shape=(tokens, dim)")
        return {"encoder_hidden_states": Part(tuple(cond_shape))}

    @property
    def cond_shape(self) -> tuple | dict:
        """Per-sample shape of ``cond``: a tuple for one tensor, ``{name: shape}`` for several parts."""
        if len(self.parts) <= 1:
            return next(iter(self.parts.values())).shape if self.parts else ()
        return {k: p.shape for k, p in self.parts.items()}

    @property
    def cond_names(self) -> list[str]:
        """The names of the conditioning inputs (the model's keywords; the ONNX input names)."""
        return list(self.parts)

    # -- calling convention ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.sample_shape[0]:
            raise DiffpressError(
                f"x_t has shape {tuple(x.shape)}; this denoiser takes (B, {self.sample_shape[0]}, H, W)")
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        if t.numel() == 1:
            t = t.reshape(()).expand(x.shape[0])
        if self.cond_kind != "none" and cond is None:
            raise DiffpressError(f"this denoiser is conditional ({self.cond_kind}); pass cond")
        if len(self.parts) > 1 and self.kind != "module" and not isinstance(cond, dict):
            cond = self._with_defaults(cond)
        self.runtime.t = t
        out = self.adapter.forward(self.model, x, t, cond)
        if self._split_sigma:
            out = out[:, : self.sample_shape[0]]
        return out

    def _with_defaults(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """A bare tensor for the one input without a default; the others (masks, sizes) at their defaults."""
        free = [k for k, p in self.parts.items() if p.fill is None]
        if len(free) != 1:
            raise DiffpressError(f"this denoiser takes several conditioning inputs; pass cond as a dict with keys "
                                 f"{self.cond_names}")
        g = torch.Generator().manual_seed(0)
        return {k: cond if k == free[0] else p.example(cond.shape[0], g) for k, p in self.parts.items()}

    # -- conditioning helpers ------------------------------------------------------------------
    @property
    def supports_guidance(self) -> bool:
        """True when there is a null condition for classifier-free guidance."""
        return self.null_label is not None or self.cond_kind == "hidden_states"

    @property
    def default_guidance(self) -> float:
        """The family's default (1 for guidance-distilled FLUX.1), else 3.0 for a conditional model with a null
        condition and 1.0 (no guidance) otherwise."""
        if self.adapter.guidance is not None:
            return self.adapter.guidance
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

    def null_cond(self, batch: int, like: Any = None) -> Any:
        """The unconditional ``cond`` for classifier-free guidance: the null label, or zero states shaped
        ``like`` the conditional ones (the empty-prompt convention for text models without an encoder);
        parts such as sizes, ids and masks keep their conditional value."""
        if self.null_label is not None:
            return self.encode_labels(torch.full((batch,), self.null_label, dtype=torch.long))
        if self.cond_kind != "hidden_states":
            raise DiffpressError(
                "this denoiser has no null condition, so classifier-free guidance is impossible; use guidance=1, "
                "or pass num_classes=N if label N is the null class the model was trained with")
        if like is None:
            like = self.example_cond(batch)
        if not isinstance(like, dict):
            return torch.zeros_like(like)
        return {k: v.clone() if self.parts[k].null == "same" else torch.zeros_like(v) for k, v in like.items()}

    def example_cond(self, batch: int = 1, seed: int = 0) -> Any:
        """A ``cond`` for ``batch`` samples: random labels, or random normal states (not a real text
        encoding: for shapes, timing and smoke runs) with the fixed parts (sizes, masks) at their defaults."""
        g = torch.Generator().manual_seed(seed)
        if self.cond_kind == "none":
            return None
        if self.cond_kind == "class" or self.conditioner is not None:
            if not self.num_classes:
                raise DiffpressError("class-conditional denoiser without num_classes; pass num_classes=N")
            return self.encode_labels(torch.randint(0, self.num_classes, (batch,), generator=g))
        values = {k: p.example(batch, g, self.num_classes) for k, p in self.parts.items()}
        return values if len(values) > 1 else next(iter(values.values()))

    def example_inputs(self, batch: int = 1, sample_shape: tuple[int, int, int] | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Random ``(x_t, t, cond)`` of the right shapes and dtypes, for capture, export and timing."""
        if self.cond_kind == "class" and not self.num_classes:
            raise DiffpressError("class-conditional denoiser without num_classes; pass num_classes=N")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *(sample_shape or self.sample_shape), generator=g)
        t = torch.full((batch,), 500, dtype=self.adapter.timestep_dtype)
        return x, t, self.example_cond(batch, seed)

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, force: bool = False) -> Path:
        """Write a pipeline folder (``model_index.json``, model, scheduler, conditioner) that ``load`` reads.

        A compressed denoiser is written as its architecture config, ``compressed.safetensors`` (its whole
        state: integer weights, scales) and ``diffpress.json`` (the passes and per-layer settings), so
        ``load`` rebuilds it without recalibrating. Writes atomically; an existing ``path`` needs ``force=True``.
        """
        import diffusers

        from diffpress._io import _umask, atomic_dir

        self.check_savable()
        key = self.adapter.component
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
            if self.sample_shape != self.adapter.sample_shape(self.model):  # not readable from the config
                index["diffpress"]["sample_shape"] = list(self.sample_shape)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return Path(path)

    def check_savable(self) -> None:
        """Raise :class:`DiffpressError` unless :meth:`save_pretrained` can write this denoiser."""
        if self.kind == "module" or not hasattr(self.model, "save_config"):
            raise DiffpressError(
                f"{type(self.model).__name__} is a plain nn.Module, which diffpress cannot save (it would need your "
                "model's code to rebuild it): save its state_dict yourself, or run without an output folder "
                "(diffpress.run_recipe(..., out=None))")

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
