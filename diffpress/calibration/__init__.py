"""Calibration: timestep policies, CalibrationSet (collect, save, load, stream) and activation observers."""
from __future__ import annotations

import importlib

_LAZY = {"CalibrationSet": "diffpress.calibration.dataset", "collect": "diffpress.calibration.dataset",
         "TimestepPolicy": "diffpress.calibration.policies"}


def __getattr__(name: str):  # lazy: the policies (numpy only) load without torch
    if name not in _LAZY:
        raise AttributeError(f"module 'diffpress.calibration' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["CalibrationSet", "TimestepPolicy", "collect"]
