"""Reading JSONL line by line with line numbers, shared by every step that takes JSONL data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


def iter_lines(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, value, error) per non-blank line; `error` says why a line is not JSON (value None).

    Callers decide whether a bad line stops them (training data) or is reported and counted (drift checks).
    """
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as err:
                    yield n, None, f"not valid JSON ({err.msg})"
