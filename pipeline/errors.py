"""Exceptions that carry the offending file (and line) in their message."""

from __future__ import annotations

from pathlib import Path


class ConfrankError(Exception):
    """Base class: a user-facing error; the CLI prints its message on one line and exits 1."""


class FormatError(ConfrankError, ValueError):
    """A file does not follow its format.

    The message always names the file, the 1-based line when there is one, and what was expected.
    """

    def __init__(self, path: str | Path, expected: str, line: int | None = None, got: str | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        msg = f"{where}: expected {expected}"
        if got is not None:
            msg += f", got {got!r}"
        super().__init__(msg)
        self.path = str(path)
        self.line = line


class SchemaError(ConfrankError, ValueError):
    """A Parquet file's columns or types do not match the contract in `pipeline.tables`."""


class MissingInputError(ConfrankError, FileNotFoundError):
    """An input named by an annotation, config or command line does not exist."""
