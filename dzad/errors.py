"""Errors that the edges (CLI, stages, flows) turn into one clear line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class DZADError(Exception):
    """Base class: the message is meant to be shown to the user as it is."""


class DZADInputError(DZADError):
    """A file or folder the user gave cannot be used; the message names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(DZADInputError):
    """A checkpoint folder is missing, incomplete, corrupt or from an incompatible version."""


class BackboneUnavailable(DZADError):
    """Pretrained backbone weights are not installed; never silently replaced by random ones."""
