"""Families diffpress knows and refuses, each with the reason."""
from __future__ import annotations

from diffpress.adapters.base import Refused


class UVit2D(Refused):
    name = "uvit2d"
    classes = ("UVit2DModel",)
    refuse = ("UVit2DModel (aMUSEd) is a masked-token generator: it predicts logits over a VQ codebook for token "
              "ids, not the noise / velocity of a Gaussian denoiser, so diffpress's calibration along a Gaussian "
              "sampling trajectory does not apply to it")


class PriorTransformer(Refused):
    name = "prior"
    classes = ("PriorTransformer",)
    refuse = ("PriorTransformer (unCLIP / Kandinsky prior) denoises image embeddings, not images; diffpress "
              "compresses image denoisers")
