"""Compression passes, one module per method, and the registry that rebuilds a saved compressed model."""
from __future__ import annotations

from typing import Any

from diffpress.compress.reconstruct import ReconstructConfig
from diffpress.compress.quantize import QuantizeConfig, QuantizeReport, quantize_, restore_quantize
from diffpress.errors import DiffpressError

RESTORERS = {"quantize": restore_quantize}


def restore(denoiser, records: list[dict[str, Any]]) -> None:
    """Re-apply the module rewrites recorded in ``denoiser.compression`` of a saved model, in order."""
    for record in records:
        if record.get("pass") not in RESTORERS:
            raise DiffpressError(f"unknown pass {record.get('pass')!r} in diffpress.json; "
                                 f"this diffpress knows: {', '.join(RESTORERS)}")
        RESTORERS[record["pass"]](denoiser, record)


__all__ = ["QuantizeConfig", "ReconstructConfig", "QuantizeReport", "quantize_", "restore"]
