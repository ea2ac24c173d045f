"""Load a denoiser from a local path or a zoo name; never touches the network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffpress.errors import DiffpressError

if TYPE_CHECKING:
    from diffpress.denoiser import Denoiser

MODEL_KEYS = ("unet", "transformer")


def _check_safetensors(folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth"))
        hint = (f" (found {', '.join(other)}: diffpress loads safetensors only; re-save with "
                "save_pretrained(safe_serialization=True))") if other else ""
        raise DiffpressError(f"no .safetensors weights in {folder}{hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:  # reading the last tensor proves the data section is complete
                    st.get_slice(keys[-1])[...]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DiffpressError(
                f"{f} is corrupt or truncated ({exc}); re-download or re-save the checkpoint") from exc


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else (a list, a number, bad JSON, unreadable) is a DiffpressError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffpressError(f"{path} is not valid JSON ({exc}); the folder is damaged") from exc
    except RecursionError:
        raise DiffpressError(f"{path} nests too deeply to be a config; the folder is damaged") from None
    if not isinstance(data, dict):
        raise DiffpressError(f"{path} holds a JSON {type(data).__name__}, not an object (mapping); the folder is damaged")
    return data


def _load_model(folder: Path, weights: bool = True):
    """The diffusers model in ``folder``; with ``weights=False`` only its architecture (the values of a
    compressed model come from its own state file)."""
    import diffpress.adapters as adapters

    config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise DiffpressError(f"{folder}/config.json names no _class_name, so diffpress cannot tell the model family; "
                             f"supported: {adapters.supported_text()}")
    try:
        cls = adapters.for_class(name).model_class(name)
    except DiffpressError as exc:
        raise DiffpressError(f"{folder} holds a {name}: {exc}") from None
    if not weights:
        try:
            return cls.from_config(config).eval()
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise DiffpressError(f"could not build {name} from {folder}/config.json: {type(exc).__name__}: "
                                 f"{exc}") from exc
    _check_safetensors(folder)
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                          low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise DiffpressError(f"could not load {name} from {folder}: {exc}") from exc
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise DiffpressError(f"the weights in {folder} do not match its config.json ({problems}); "
                             "the checkpoint is incomplete or belongs to another architecture")
    _check_finite(model, folder)
    return model.eval()


def _check_finite(module, source: Path) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor."""
    import torch

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DiffpressError(f"{source}: tensor {name} holds NaN or inf values; the checkpoint is broken "
                                 "(a diverged training run or a bad conversion): use another checkpoint")


def _load_scheduler_config(folder: Path, class_name: str | None) -> dict | None:
    import diffusers

    path = folder / "scheduler_config.json"
    if not path.exists():
        return None
    config = _read_json(path)
    name = class_name or config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name else None
    if not isinstance(cls, type):
        cls = None
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise DiffpressError(f"{path} names scheduler {name!r}, which is not a diffusers scheduler")
    try:
        return dict(cls.from_config(config).config, _class_name=cls.__name__)
    except (NotImplementedError, ValueError, TypeError, KeyError) as exc:
        raise DiffpressError(f"{path}: {cls.__name__} rejects this config ({type(exc).__name__}: {exc}); fix the "
                             "scheduler config or remove the scheduler folder (diffpress then samples with DDIM)")


def _load_conditioner(folder: Path, spec: list, weights: bool = True):
    from diffpress.zoo.conditioner import LabelEmbedding

    if not isinstance(spec, list) or spec != ["diffpress", "LabelEmbedding"]:
        raise DiffpressError(f"unsupported conditioner {spec} in {folder.parent}; supported: diffpress LabelEmbedding")
    if not weights:
        return LabelEmbedding.from_config(_read_json(folder / "config.json")).eval()
    _check_safetensors(folder)
    conditioner = LabelEmbedding.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    _check_finite(conditioner, folder)
    return conditioner.eval()


def _restore_compressed(den: Denoiser, path: Path) -> None:
    """Rebuild the compressed modules recorded in diffpress.json, then fill them from compressed.safetensors."""
    from safetensors import SafetensorError, safe_open

    from diffpress._io import unpack_int
    from diffpress.compress import registry
    from diffpress.denoiser import COMPRESSED_FORMAT, COMPRESSED_FORMATS

    manifest = _read_json(path / "diffpress.json")
    if not isinstance(manifest, dict) or manifest.get("format") not in COMPRESSED_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DiffpressError(f"{path}/diffpress.json has format {found!r}; this diffpress reads "
                             f"{COMPRESSED_FORMAT}: upgrade diffpress or re-run the compression")
    registry.restore(den, manifest.get("passes") or [])
    weights = path / "compressed.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            packed = json.loads((f.metadata() or {}).get("packed", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        for key, info in packed.items():
            state[key] = unpack_int(state[key], info["bits"], tuple(info["shape"]))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise DiffpressError(f"{weights} is missing, corrupt or truncated ({exc}); re-save the compressed model") from exc
    result = den.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise DiffpressError(f"{weights} does not match diffpress.json: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
    _check_finite(den, weights)


def resolve_source(source: str | Path) -> Path:
    """The folder ``source`` names (a zoo name or a local folder), checked without loading anything heavy.

    >>> resolve_source("digits-dit").name
    'digits-dit'
    >>> resolve_source("/no/such/model")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: no such file or folder: /no/such/model; give a diffusers model folder (config.json + .safetensors), a pipeline folder (model_index.json) or a zoo name (digits-unet, digits-cond-unet, digits-dit)
    """
    import diffpress.zoo as zoo

    path = Path(source)
    if not path.exists() and str(source) in zoo.DENOISERS:
        path = zoo.path(str(source))
    if not path.exists():
        raise DiffpressError(
            f"no such file or folder: {source}; give a diffusers model folder (config.json + .safetensors), "
            f"a pipeline folder (model_index.json) or a zoo name ({', '.join(zoo.DENOISERS)})")
    if not path.is_dir():
        raise DiffpressError(
            f"{source} is a file; diffpress loads folders: a diffusers model folder (config.json + "
            ".safetensors) or a pipeline folder (model_index.json)")
    return path


def load(source: str | Path, *, prediction_type: str | None = None) -> "Denoiser":
    """Load a :class:`Denoiser` from a zoo name, a diffusers model folder or a pipeline folder.

    A model folder holds ``config.json`` and safetensors weights; a pipeline folder holds
    ``model_index.json`` with a ``unet`` or ``transformer`` and (optionally) a ``scheduler``, whose
    config gives the prediction type and the default sampler.

    >>> den = load("digits-cond-unet")
    >>> den.kind, den.cond_kind, den.sample_shape
    ('unet2d_condition', 'hidden_states', (1, 16, 16))
    """
    from diffpress.denoiser import Denoiser

    path = resolve_source(source)
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        key = next((k for k in MODEL_KEYS if k in index), None)
        if key is None:
            raise DiffpressError(f"{path}/model_index.json names no 'unet' or 'transformer' component")
        compressed = (path / "diffpress.json").exists()  # architecture here, values in compressed.safetensors
        model = _load_model(path / key, weights=not compressed)
        sched_spec = index.get("scheduler")
        if sched_spec is not None and not (isinstance(sched_spec, list) and len(sched_spec) == 2):
            raise DiffpressError(f"{path}/model_index.json: 'scheduler' should be [library, class], got {sched_spec!r}")
        scheduler_config = _load_scheduler_config(path / "scheduler", sched_spec[1] if sched_spec else None)
        conditioner = (_load_conditioner(path / "conditioner", index["conditioner"], weights=not compressed)
                       if "conditioner" in index else None)
        extra = index.get("diffpress") or {}
        if not isinstance(extra, dict):
            raise DiffpressError(f"{path}/model_index.json: 'diffpress' should be a mapping, got {extra!r}")
        prediction_type = prediction_type or extra.get("prediction_type")
        shape = extra.get("sample_shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                      and all(isinstance(d, int) and d > 0 for d in shape)):
            raise DiffpressError(f"{path}/model_index.json: diffpress.sample_shape should be [C, H, W], got {shape!r}")
        den = Denoiser(model, prediction_type=prediction_type, conditioner=conditioner,
                       scheduler_config=scheduler_config, sample_shape=tuple(shape) if shape else None)
        if compressed:
            _restore_compressed(den, path)
        return den.eval()
    if (path / "config.json").exists():
        return Denoiser(_load_model(path), prediction_type=prediction_type).eval()
    raise DiffpressError(
        f"{path} is neither a diffusers model folder (config.json + .safetensors) nor a pipeline folder "
        "(model_index.json)")
