"""Files that ship with llmcycle: the default constitution and the red-team prompts."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped file `name` (e.g. `constitution.yaml`), with a clear error when it is missing."""
    found = FOLDER / name
    if not found.is_file():
        raise FileNotFoundError(f"{found}: this installation lacks the shipped file {name!r}; reinstall llmcycle")
    return found
