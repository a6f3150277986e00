"""Input files (traces, datasets): errors that name the file and the 1-based line, and the
line reader both use."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator


class InputFileError(ValueError):
    """A file that cannot be read; names the file and (when known) the 1-based line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


def file_lines(path: str | Path, error: type[InputFileError], what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 file (a BOM is dropped); an unreadable
    file or a line that is not UTF-8 raises `error` naming the file and the line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(path, None, f"cannot read {what}: {exc.strerror or exc}") from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, chunk in enumerate(raw.splitlines(), start=1):
        try:
            yield number, chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise error(path, number, "line is not valid UTF-8") from None
