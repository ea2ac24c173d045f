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
from diffpress._version import __version__
from diffpress.calibration import CalibrationSet, TimestepPolicy
from diffpress.calibration import collect as calibrate
from diffpress.compress import QuantizeConfig, ReconstructConfig, quantize_
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.eval import evaluate
from diffpress.exporters import export_onnx, export_torchscript
from diffpress.loading import load
from diffpress.recipes import run_recipe
from diffpress.sampling import SampleOutput, Trajectory, make_scheduler, sample

__all__ = ["CalibrationSet", "Denoiser", "DiffpressError", "QuantizeConfig", "ReconstructConfig", "SampleOutput",
           "TimestepPolicy", "Trajectory", "__version__", "calibrate", "evaluate", "export_onnx", "export_torchscript",
           "load", "make_scheduler", "quantize_", "run_recipe", "sample"]
