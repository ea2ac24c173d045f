"""Compression passes, one module per method, and the one registry they register in (:mod:`.registry`).

Importing this package registers the built-in passes, so :func:`diffpress.load` can rebuild any of them.
"""
from __future__ import annotations

from diffpress.compress import registry
from diffpress.compress.cache import CacheConfig, CacheReport, cache_
from diffpress.compress.lora import apply_lora
from diffpress.compress.lowrank import LowRankConfig, LowRankReport, lowrank_
from diffpress.compress.prune import PruneConfig, PruneReport, prune_
from diffpress.compress.quantize import QuantizeConfig, QuantizeReport, quantize_
from diffpress.compress.reconstruct import ReconstructConfig
from diffpress.compress.registry import PassSpec, register

__all__ = ["CacheConfig", "CacheReport", "cache_", "LowRankConfig", "LowRankReport", "PassSpec", "PruneConfig", "PruneReport", "prune_", "QuantizeConfig", "QuantizeReport", "ReconstructConfig", "apply_lora", "lowrank_",
           "quantize_", "register", "registry"]
