"""Evaluation harness: quality against the reference model and real data, cost, reports and grids."""
from diffpress.eval.metrics import conditional_accuracy, frechet_distance, psnr, ssim
from diffpress.eval.report import Report, evaluate

__all__ = ["Report", "conditional_accuracy", "evaluate", "frechet_distance", "psnr", "ssim"]
