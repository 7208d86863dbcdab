"""Device side: measuring what a run costs on the phone (stdlib + numpy + onnxruntime only)."""

from pocketzo.mobile_harness.memory import peak_rss_mb

__all__ = ["peak_rss_mb"]
