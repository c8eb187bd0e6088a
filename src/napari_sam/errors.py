"""Typed exceptions raised by napari-sam.

Library code raises these (never bare ``assert``) with messages that tell the
user what to do; widgets turn them into napari notifications.
"""

from __future__ import annotations


class NapariSamError(Exception):
    """Base class of every error napari-sam raises on purpose."""


class InvalidInputError(NapariSamError, ValueError):
    """An argument has the wrong type, shape, dtype or value."""


class ModelNotFoundError(NapariSamError, KeyError):
    """A model name is not in the zoo and is not an existing file."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(NapariSamError):
    """A checkpoint file is corrupt, truncated, unsafe or does not fit the model."""


class DownloadError(NapariSamError, OSError):
    """A checkpoint could not be downloaded (no network, bad hash, ...)."""


class CancelledError(NapariSamError):
    """Long-running work was cancelled by the user."""


class StoreMismatchError(InvalidInputError):
    """An embedding store was made for another model, image, normalisation or tiling."""
