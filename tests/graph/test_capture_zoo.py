import pytest
import torch

import diffpress
from diffpress import zoo
from diffpress.graph import capture


@pytest.mark.parametrize("name", zoo.DENOISERS)
def test_capture_every_zoo_model(name):
    den = diffpress.load(name)
    graph = capture(den, batch=2)
    args = den.example_inputs(2)
    with torch.no_grad():
        assert torch.allclose(graph.gm(*args), den(*args), atol=1e-5)
    roles = [r for layer in graph.layers for r in layer.roles]
    assert roles.count("first") == 1 and roles.count("last") == 1
    assert graph.macs == sum(layer.macs for layer in graph.layers) > 1_000_000
    if den.kind != "dit":  # UNet decoders read skip-concats
        assert sum(layer.concat_split is not None for layer in graph.layers) >= 6
