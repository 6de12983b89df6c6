"""Exception hierarchy for clipengine: every error a user can cause is one of these."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CheckpointError",
    "ClipEngineError",
    "DatasetError",
    "DecodeError",
    "DownloadError",
    "DownloadNotAllowedError",
    "DuplicateIdError",
    "ExportParityError",
    "IndexFileError",
    "IndexMismatchError",
    "InputError",
    "OutputBusyError",
    "TextTooLongError",
    "UnknownModelError",
]


class ClipEngineError(Exception):
    """Base class: the CLI turns any of these into a one-line message and exit code 1."""


class UnknownModelError(ClipEngineError, KeyError):
    """A model name or pretrained tag that the registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ClipEngineError):
    """A checkpoint file is unreadable, or has missing/unexpected keys or wrong shapes."""


class DecodeError(ClipEngineError):
    """An image could not be decoded; the message names the source and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class TextTooLongError(ClipEngineError):
    """A text does not fit the context length and truncation was refused."""


class BackendError(ClipEngineError):
    """A backend cannot be created or failed to run."""


class ExportParityError(ClipEngineError):
    """An exported engine differs from the PyTorch reference by more than its bound."""


class DownloadNotAllowedError(ClipEngineError):
    """Weights are not in the cache and downloading was not allowed."""


class DownloadError(ClipEngineError):
    """A download failed (offline, HTTP error, checksum mismatch)."""


class IndexMismatchError(ClipEngineError):
    """Stored embeddings (an index, or an embed output folder being resumed) were made with another
    model, embedding size or settings than the ones in use."""


class DatasetError(ClipEngineError):
    """A dataset folder or file is missing or not in the expected format."""


class IndexFileError(ClipEngineError):
    """An index folder is missing, incomplete or corrupted (a file absent, truncated or unreadable)."""


class OutputBusyError(ClipEngineError):
    """An output folder is being written by another clipengine run (another process holds its lock);
    retry once that run has ended."""


class DuplicateIdError(ClipEngineError, ValueError):
    """Ids added to an index are already in it (or repeated within the batch)."""


class InputError(BackendError, ValueError):
    """An argument a function cannot take: the wrong type, shape, dtype or range (texts that are not
    str, token ids outside the vocabulary, non-float or non-finite pixels, an unknown option value).
    The message names the argument and the fix.

    It subclasses BackendError because these checks raised BackendError before this class existed,
    so code that catches BackendError for them keeps working; and ValueError, as any bad value is.
    Real backend failures (a session that cannot be created, an engine that fails to run) stay
    BackendError.
    """

