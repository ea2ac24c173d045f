"""Compression passes, one module per method, and the one registry they register in (:mod:`.registry`).

Importing this package registers the built-in passes, so :func:`diffpress.load` can rebuild any of them.
"""
from __future__ import annotations

from diffpress.compress import registry
from diffpress.compress.quantize import QuantizeConfig, QuantizeReport, quantize_
from diffpress.compress.reconstruct import ReconstructConfig
from diffpress.compress.registry import PassSpec, register

__all__ = ["PassSpec", "QuantizeConfig", "QuantizeReport", "ReconstructConfig", "quantize_", "register", "registry"]
