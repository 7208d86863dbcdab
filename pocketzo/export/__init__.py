"""Desktop side: Hugging Face model -> pocketzo bundle (torch, transformers, onnx live here).

``ExportConfig`` imports no torch; ``export_bundle`` loads the exporter (and torch) on first use.
"""

from pocketzo.export.config import ExportConfig

__all__ = ["ExportConfig", "export_bundle"]


def __getattr__(name: str):
    if name == "export_bundle":
        from pocketzo.export.exporter import export_bundle

        return export_bundle
    raise AttributeError(f"module 'pocketzo.export' has no attribute {name!r}")
