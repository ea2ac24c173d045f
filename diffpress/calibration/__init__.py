"""Calibration: timestep policies, CalibrationSet (collect, save, load, stream) and activation observers."""
from __future__ import annotations

from diffpress._lazy import lazy_getattr

# lazy: the policies (numpy only) load without torch
__getattr__ = lazy_getattr(__name__, {"CalibrationSet": "diffpress.calibration.dataset",
                                      "collect": "diffpress.calibration.dataset",
                                      "TimestepPolicy": "diffpress.calibration.policies"})


__all__ = ["CalibrationSet", "TimestepPolicy", "collect"]
