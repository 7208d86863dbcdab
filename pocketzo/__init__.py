"""pocketzo: fine-tune language models forward-only on ONNX Runtime, on the phone that holds the data."""

__version__ = "0.1.0"

__all__ = ["__version__"]
