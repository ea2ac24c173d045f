"""Capture a denoiser's graph (torch.export -> torch.fx) and answer structural questions on it."""
from diffpress.graph.capture import Graph, Layer, capture

__all__ = ["Graph", "Layer", "capture"]
