"""diffpress: post-training compression for diffusion denoisers.

The public API is a few verbs and their configs:

>>> import diffpress
>>> den = diffpress.load("digits-cond-unet")
>>> out = diffpress.sample(den, labels=[1, 2], guidance=3.0, steps=10, progress=False)
>>> out.images.shape
torch.Size([2, 1, 16, 16])
>>> cs = diffpress.calibrate(den, num_samples=4, steps=10, policy=diffpress.TimestepPolicy("uniform", count=3),
...                          progress=False)
>>> report = diffpress.quantize_(den, diffpress.QuantizeConfig(), cs, progress=False)
>>> len(report.quantized) > 0
True
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from diffpress._lazy import lazy_getattr
from diffpress._version import __version__
from diffpress.errors import DiffpressError

# name -> module: imported on first use, so `import diffpress` (and the CLI's argument checks) stay light
_LAZY = {
    "CalibrationSet": "diffpress.calibration.dataset", "TimestepPolicy": "diffpress.calibration.policies",
    "calibrate": "diffpress.calibration.dataset:collect", "QuantizeConfig": "diffpress.compress.quantize",
    "ReconstructConfig": "diffpress.compress.reconstruct", "quantize_": "diffpress.compress.quantize",
    "LowRankConfig": "diffpress.compress.lowrank", "lowrank_": "diffpress.compress.lowrank",
    "CacheConfig": "diffpress.compress.cache", "cache_": "diffpress.compress.cache",
    "apply_lora": "diffpress.compress.lora", "PruneConfig": "diffpress.compress.prune", "prune_": "diffpress.compress.prune",
    "Denoiser": "diffpress.denoiser", "evaluate": "diffpress.eval.report", "export_onnx": "diffpress.exporters.onnx",
    "export_torchscript": "diffpress.exporters.torchscript", "export_executorch": "diffpress.exporters.executorch",
    "load_executorch": "diffpress.exporters.executorch", "load": "diffpress.loading",
    "run_recipe": "diffpress.recipes.runner", "SampleOutput": "diffpress.sampling", "Trajectory": "diffpress.sampling",
    "make_scheduler": "diffpress.sampling", "sample": "diffpress.sampling",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from diffpress.calibration.dataset import CalibrationSet
    from diffpress.calibration.dataset import collect as calibrate
    from diffpress.calibration.policies import TimestepPolicy
    from diffpress.compress.cache import CacheConfig, cache_
    from diffpress.compress.lora import apply_lora
    from diffpress.compress.lowrank import LowRankConfig, lowrank_
    from diffpress.compress.prune import PruneConfig, prune_
    from diffpress.compress.quantize import QuantizeConfig, quantize_
    from diffpress.compress.reconstruct import ReconstructConfig
    from diffpress.denoiser import Denoiser
    from diffpress.eval.report import evaluate
    from diffpress.exporters.executorch import export_executorch, load_executorch
    from diffpress.exporters.onnx import export_onnx
    from diffpress.exporters.torchscript import export_torchscript
    from diffpress.loading import load
    from diffpress.recipes.runner import run_recipe
    from diffpress.sampling import SampleOutput, Trajectory, make_scheduler, sample


# diffpress.zoo etc. work without importing them first, as before the face was lazy
__getattr__ = lazy_getattr(__name__, _LAZY, submodules=(
    "calibration", "compress", "deploy", "distributed", "eval", "exporters", "graph", "recipes", "runtime", "zoo"))


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CacheConfig",
    "CalibrationSet",
    "Denoiser",
    "DiffpressError",
    "LowRankConfig",
    "PruneConfig",
    "QuantizeConfig",
    "ReconstructConfig",
    "SampleOutput",
    "TimestepPolicy",
    "Trajectory",
    "__version__",
    "apply_lora",
    "cache_",
    "calibrate",
    "evaluate",
    "export_executorch",
    "export_onnx",
    "export_torchscript",
    "load",
    "load_executorch",
    "lowrank_",
    "make_scheduler",
    "prune_",
    "quantize_",
    "run_recipe",
    "sample",
]
