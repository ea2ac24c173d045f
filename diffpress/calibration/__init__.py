"""Calibration: timestep policies, CalibrationSet (collect, save, load, stream) and activation observers."""
from diffpress.calibration.dataset import CalibrationSet, collect
from diffpress.calibration.policies import TimestepPolicy

__all__ = ["CalibrationSet", "TimestepPolicy", "collect"]
