"""The one user-facing error type: a single line that names the file and the problem (CLI exit status 2)."""

from __future__ import annotations

from pathlib import Path


class ImpqError(Exception):
    """A problem with the user's input. `str(err)` is the one line the CLI prints."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        # rebuilt from both fields, so that the error survives a trip back from a worker process
        return type(self), (self.path, self.problem)
