"""Device side: open a bundle and run its loss graph over a zero-copy flat weight buffer.

Imports only the standard library, numpy and onnxruntime (tokenizers lazily, in ``data``).
"""

from pocketzo.runtime.bundle import Bundle
from pocketzo.runtime.manifest import FORMAT_VERSION, Manifest, TaskSpec, TensorSpec
from pocketzo.runtime.session import FlatParameters, SessionConfig, TrainingSession

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "FlatParameters",
    "Manifest",
    "SessionConfig",
    "TaskSpec",
    "TensorSpec",
    "TrainingSession",
]
