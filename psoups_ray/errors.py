"""Errors the CLI reports as a clear message instead of a traceback."""

from __future__ import annotations


class PsoupsError(Exception):
    """Base class for errors caused by the user's input or environment.

    The CLI prints these as ``error: <message>`` and exits with status 2.
    """


class ConfigError(PsoupsError, ValueError):
    """An invalid configuration: every problem found, one per line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        where = f" from {source}" if source else ""
        super().__init__(
            f"invalid configuration{where} ({len(self.problems)} problem(s)):\n{lines}"
        )


class StorageError(PsoupsError, OSError):
    """A run directory that cannot be read or written, or a missing artifact."""
