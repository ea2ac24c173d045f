"""Exporters: ONNX (standard Q/DQ, verified in ONNX Runtime) and TorchScript (deprecated upstream, kept)."""
from diffpress.exporters.onnx import ExportResult, export_onnx
from diffpress.exporters.torchscript import export_torchscript

__all__ = ["ExportResult", "export_onnx", "export_torchscript"]
