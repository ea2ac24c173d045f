"""Reference models: tiny digits denoisers trained by ``diffpress.zoo.train`` and shipped with the package,
a digits classifier for the metrics, and real-size architectures with random weights (``architectures``).

>>> sorted(DENOISERS)
['digits-cond-unet', 'digits-dit', 'digits-unet']
"""
from __future__ import annotations

from pathlib import Path

from diffpress.errors import DiffpressError

WEIGHTS_DIR = Path(__file__).parent / "weights"
DENOISERS = ("digits-unet", "digits-cond-unet", "digits-dit")
DEFAULT_MODEL = "digits-cond-unet"


def path(name: str) -> Path:
    """Folder of a shipped zoo model."""
    if name not in DENOISERS and name != "digits-classifier":
        raise DiffpressError(f"unknown zoo model {name!r}; available: {', '.join(DENOISERS)}, digits-classifier")
    p = WEIGHTS_DIR / name
    if not p.exists():
        raise DiffpressError(f"zoo weights for {name} are missing at {p}; train them: python -m diffpress.zoo.train {name}")
    return p


def load_classifier():
    """The digits classifier (eval mode) used by the FD and conditional-accuracy metrics.

    >>> import torch
    >>> load_classifier()(torch.zeros(1, 1, 16, 16)).shape
    torch.Size([1, 10])
    """
    from safetensors.torch import load_file

    from diffpress.zoo.models import DigitsClassifier

    clf = DigitsClassifier()
    clf.load_state_dict(load_file(path("digits-classifier") / "model.safetensors"))
    return clf.eval()
