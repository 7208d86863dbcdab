"""Desktop side: Hugging Face model -> pocketzo bundle (torch, transformers, onnx live here)."""

from pocketzo.export.exporter import ExportConfig, export_bundle

__all__ = ["ExportConfig", "export_bundle"]
