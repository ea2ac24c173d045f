"""Quality metrics that need no downloaded weights: fidelity to a reference model's samples (PSNR, SSIM),
distribution quality in the digits classifier's feature space (Fréchet distance) and conditional accuracy.

Images are in [-1, 1] (the denoisers' data range) unless said otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from diffpress.errors import DiffpressError


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise DiffpressError(f"sample sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise DiffpressError("samples contain NaN or inf; the model diverged")


def psnr(reference: torch.Tensor, candidate: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over the whole sample set (pooled mean squared error); ``inf`` when identical.

    >>> x = torch.zeros(4, 1, 8, 8)
    >>> round(psnr(x, x + 0.02), 2)  # 10*log10(2**2 / 0.02**2)
    40.0
    """
    _check_pair(reference, candidate)
    mse = F.mse_loss(candidate.double(), reference.double()).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(reference: torch.Tensor, candidate: torch.Tensor, data_range: float = 2.0,
         window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, Gaussian window, valid region) over images and channels; 1.0 when identical.

    The window is 7 px (smaller than the usual 11 so 16x16 samples keep a 10x10 valid map).

    >>> x = torch.rand(2, 1, 16, 16) * 2 - 1
    >>> ssim(x, x)
    1.0
    """
    _check_pair(reference, candidate)
    window = min(window, reference.shape[-1], reference.shape[-2])
    w = _gaussian_window(window, sigma)
    a = reference.double().flatten(0, 1)[:, None]
    b = candidate.double().flatten(0, 1)[:, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean().clamp(max=1.0))


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples); 0 when equal.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, computed with symmetric
    eigendecompositions (stable, no complex square roots).

    >>> f = np.random.default_rng(0).normal(size=(500, 8))
    >>> frechet_distance(f, f) < 1e-8
    True
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DiffpressError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise DiffpressError("the Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(fd, 0.0)


@torch.no_grad()
def classifier_outputs(classifier: torch.nn.Module, images: torch.Tensor,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of ``images`` under a classifier with a ``features`` method and a ``head``."""
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i:i + batch_size].clamp(-1, 1))
        feats.append(f)
        logits.append(classifier.head(f))
    return torch.cat(feats), torch.cat(logits)


def conditional_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples the classifier assigns to the requested class.

    >>> conditional_accuracy(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, 1]))
    0.5
    """
    return float((logits.argmax(1) == labels).double().mean())
