"""The one error hierarchy of pocketzo.

Every error a user can cause (bad file, bad row, bad flag) is a ``PocketzoError``
whose message says what was wrong, where, and what to do. The CLI prints the
message on one line and exits non-zero; only ``--debug`` shows a traceback.
"""

from __future__ import annotations


class PocketzoError(Exception):
    """Base class: a user-facing error with context."""


class BundleError(PocketzoError):
    """A bundle directory is missing a file, is corrupt, or has another format version."""


class DataError(PocketzoError):
    """A data file or one of its rows cannot be used."""


class ExportError(PocketzoError):
    """A model cannot be exported, or its export does not match PyTorch."""


class AssetError(PocketzoError):
    """A real asset could not be fetched, verified or prepared."""


class TrainingError(PocketzoError):
    """Training cannot go on (for example, the loss became non-finite)."""


class RunInterrupted(PocketzoError):
    """A run was stopped by SIGINT or SIGTERM after saving a checkpoint; it can be resumed."""
