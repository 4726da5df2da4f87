"""The error every weight-file reader raises: one line naming the file or tensor and the fix."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointError", "CheckpointNotFoundError", "require_exists"]


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file/tensor and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or directory does not exist."""


def require_exists(path: Path, what: str, fix: str) -> None:
    """CheckpointNotFoundError ``"<what> not found: <path>. <fix>"`` unless ``path`` exists."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{what} not found: {path}. {fix}")
