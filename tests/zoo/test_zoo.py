import json

import pytest
import torch

import diffpress
from diffpress import zoo
from diffpress.eval import metrics
from diffpress.zoo import train
from diffpress.zoo.data import load_digits


def test_digits_data_shapes_and_splits():
    x, y = load_digits("all")
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert len(ytr) + len(yte) == 1797 and len(yte) == 360
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    with pytest.raises(diffpress.DiffpressError, match="allowed"):
        load_digits("validation")


@pytest.mark.parametrize("name,kind", [("digits-unet", "unet2d"), ("digits-cond-unet", "unet2d_condition"),
                                       ("digits-dit", "dit")])
def test_training_writes_a_loadable_pipeline_folder(name, kind, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "BATCH", 8)
    train.train_denoiser(name, tmp_path / name, steps=2)
    den = diffpress.load(tmp_path / name)
    assert den.kind == kind and den.sample_shape == (1, 16, 16) and den.prediction_type == "epsilon"
    log = json.loads((tmp_path / name / "training.json").read_text())
    assert log["steps"] == 2 and log["seed"] == 0
    with pytest.raises(diffpress.DiffpressError, match="--force"):
        train.train_denoiser(name, tmp_path / name, steps=1)


def test_training_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "BATCH", 8)
    for run in ("a", "b"):
        train.train_denoiser("digits-dit", tmp_path / run, steps=3)
    a, b = diffpress.load(tmp_path / "a"), diffpress.load(tmp_path / "b")
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka


@pytest.mark.parametrize("name", zoo.DENOISERS)
def test_shipped_denoisers_load_and_generate_digits(name):
    den = diffpress.load(name)
    assert den.sample_shape == (1, 16, 16)
    assert sum(p.stat().st_size for p in zoo.path(name).rglob("*.safetensors")) < 10 * 2 ** 20  # a few MB
    clf = zoo.load_classifier()
    if den.cond_kind == "none":
        out = diffpress.sample(den, num_samples=40, steps=20, progress=False)
        feats, logits = metrics.classifier_outputs(clf, out.images)
        # unconditional samples are digits: the classifier is confident on most of them
        assert (logits.softmax(1).max(1).values > 0.9).float().mean() > 0.8
    else:
        out = diffpress.sample(den, labels=torch.arange(40) % 10, guidance=3.0, steps=20, progress=False)
        _, logits = metrics.classifier_outputs(clf, out.images)
        assert metrics.conditional_accuracy(logits, out.labels) >= 0.85


def test_unknown_zoo_name():
    with pytest.raises(diffpress.DiffpressError, match="available"):
        zoo.path("digits-vae")
