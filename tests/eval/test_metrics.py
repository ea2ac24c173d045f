import math

import numpy as np
import pytest
import torch

from diffpress.errors import DiffpressError
from diffpress.eval import metrics


def test_psnr_identical_is_infinite():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert metrics.psnr(x, x) == math.inf


def test_psnr_known_offset_and_noise_level():
    x = torch.zeros(8, 1, 16, 16)
    assert metrics.psnr(x, x + 0.02) == pytest.approx(40.0, abs=1e-6)  # 10 log10(2^2 / 0.02^2)
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(256, 1, 16, 16)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    expected = 10 * math.log10(4 / 0.01)  # data range 2, sigma 0.1
    assert metrics.psnr(clean, noisy) == pytest.approx(expected, abs=0.05)


def test_psnr_rejects_shape_mismatch_and_nan():
    with pytest.raises(DiffpressError, match="shape"):
        metrics.psnr(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(DiffpressError, match="NaN"):
        metrics.psnr(torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), float("nan")))


def test_ssim_identical_constant_and_monotone():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, -0.3, (0.01 * 2) ** 2
    got = metrics.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)  # float32 inputs
    g = torch.Generator().manual_seed(1)
    n = torch.randn(x.shape, generator=g)
    s_small, s_big = metrics.ssim(x, x + 0.05 * n), metrics.ssim(x, x + 0.3 * n)
    assert 1.0 > s_small > s_big > 0.0


def _whitened(n: int, d: int, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=(n, d))
    z -= z.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(z, rowvar=False))
    return z @ vecs @ np.diag(vals ** -0.5) @ vecs.T  # empirical mean 0, covariance exactly I


def test_frechet_distance_closed_form():
    d = 6
    a = _whitened(400, d, 0)
    b = 2 * a + 3  # mean 3, covariance 4I: FD = 9d + d (1 + 4 - 2 * 2) = 10d
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(a, b) == pytest.approx(10 * d, rel=1e-9)
    c = _whitened(400, d, 1) + 0.5  # same covariance, mean shift: FD = d * 0.25
    assert metrics.frechet_distance(a, c) == pytest.approx(0.25 * d, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(DiffpressError):
        metrics.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(DiffpressError):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((10, 3)))


def test_conditional_accuracy():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    assert metrics.conditional_accuracy(logits, torch.tensor([0, 2, 1, 1])) == 0.75


def test_zoo_classifier_is_accurate_on_held_out_digits():
    from diffpress.zoo import load_classifier
    from diffpress.zoo.data import load_digits

    x, y = load_digits("test")
    feats, logits = metrics.classifier_outputs(load_classifier(), x)
    assert feats.shape == (len(y), 64)
    assert metrics.conditional_accuracy(logits, y) > 0.97
