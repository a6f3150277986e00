"""Errors of input files (traces, datasets): the message names the file and the 1-based line."""
from __future__ import annotations

from pathlib import Path


class InputFileError(ValueError):
    """A file that cannot be read; names the file and (when known) the 1-based line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")
