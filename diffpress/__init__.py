"""diffpress: post-training compression for diffusion denoisers.

>>> import diffpress
>>> den = diffpress.load("digits-cond-unet")
>>> out = diffpress.sample(den, labels=[1, 2], guidance=3.0, steps=10, progress=False)
>>> out.images.shape
torch.Size([2, 1, 16, 16])
"""
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.loading import load
from diffpress.sampling import SampleOutput, Trajectory, make_scheduler, sample

__version__ = "0.1.0"
__all__ = ["Denoiser", "DiffpressError", "SampleOutput", "Trajectory", "load", "make_scheduler", "sample"]
