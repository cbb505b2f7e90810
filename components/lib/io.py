"""Files: JSONL read one way everywhere (errors name file:line), globs relative to the spec, atomic writes.

JSONL is UTF-8, one JSON value per line; a byte-order mark, CRLF line endings and blank lines are accepted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, value, error) per non-blank line; `error` says why a line is not JSON (value None).

    Callers decide whether a bad line stops them (training data) or is reported and counted (drift checks).
    """
    with open(path, encoding="utf-8-sig", newline=None) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as err:
                    yield n, None, f"not valid JSON ({err.msg} at column {err.colno})"


def jsonl_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a JSONL file of objects, read lazily, each tagged `_where` (file:line); a bad line raises."""
    for n, row, error in iter_jsonl(path):
        if error:
            raise ValueError(f"{path}:{n}: {error}")
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield {**row, "_where": f"{path}:{n}"}


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file of objects, each tagged `_where` (file:line); the first bad line raises."""
    return list(jsonl_rows(path))


def expand(patterns: list[str], resolve: Callable[[str], Path], field: str) -> list[Path]:
    """The files the globs match (each resolved, e.g. relative to the spec), sorted; an empty glob raises."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(resolve(pattern)), recursive=True))
        if not matches:
            raise FileNotFoundError(f"{field}: no file matches '{pattern}' (resolved to {resolve(pattern)})")
        found += [Path(m) for m in matches]
    return found


def read_jsonl_files(patterns: list[str], resolve: Callable[[str], Path], field: str) -> list[dict]:
    """The rows of every JSONL file the globs match, in file order."""
    return [row for path in expand(patterns, resolve, field) for row in read_jsonl(path)]


def held_out(row: dict, fraction: float, seed: int) -> bool:
    """Whether a row is held out: a seeded hash of its content (not its file:line) below `fraction`."""
    text = json.dumps({k: v for k, v in row.items() if k != "_where"}, sort_keys=True, default=str)
    return int(hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): `fraction` of the rows held out by a seeded hash of their content (`held_out`), so the
    split does not move when rows are added or reordered; at least one row is held out when there are two or
    more (the last kept one). A streamed file splits the same way (components/lib/datasources.py)."""
    held = [held_out(r, fraction, seed) for r in rows]
    kept = [r for r, h in zip(rows, held) if not h]
    out = [r for r, h in zip(rows, held) if h]
    if not out and len(rows) > 1:
        out, kept = kept[-1:], kept[:-1]
    return kept, out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL (UTF-8, non-ASCII kept), atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def where(row: dict) -> str:
    """The file:line a row came from (or 'row')."""
    return row.get("_where", "row")
