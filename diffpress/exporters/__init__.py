"""Exporters: ONNX (standard Q/DQ, verified in ONNX Runtime), ExecuTorch (``.pte`` for phones and edge devices,
XNNPACK backend, the optional extra ``executorch``) and TorchScript (deprecated upstream, kept)."""
from diffpress.exporters.executorch import export_executorch, load_executorch
from diffpress.exporters.onnx import ExportResult, export_onnx
from diffpress.exporters.torchscript import export_torchscript

__all__ = ["ExportResult", "export_executorch", "export_onnx", "export_torchscript", "load_executorch"]
