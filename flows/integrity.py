"""Is a complete output still what its step wrote? Sizes and checksums of every file, kept in result.json.

The step seals its output when it finishes (`seal`): `result.json` lists each file's size and sha256 and
carries a digest of its own content. Reusing an output checks the cheap part (`damage(folder)`: the digest,
each file present with its size: stats only, no reading), so a truncated weight file or an edited
result.json makes the step run again instead of serving a broken model. `llmcycle verify SPEC` reads every
byte (`damage(folder, full=True)`), which also catches a same-size edit.

Outputs written before sealing existed (no `files` in result.json) are trusted as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RESULT_FILE = "result.json"


def sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `folder` except result.json."""
    return {str(p.relative_to(folder)): [p.stat().st_size, sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / RESULT_FILE}


def _digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def escapes(folder: Path) -> list[Path]:
    """Symbolic links under `folder` that point outside it (an output must not reach out of the workdir)."""
    root = folder.resolve()
    return [p for p in folder.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(root)]


def seal(data: dict, folder: Path) -> dict:
    """`data` (a result.json body) with the manifest of `folder` and its own digest; refuse an output holding
    a link to outside itself (a model folder copied with a symlink to someone's files)."""
    outside = escapes(folder)
    if outside:
        raise ValueError(f"the output holds links that point outside it: "
                         f"{', '.join(f'{p.relative_to(folder)} -> {p.resolve()}' for p in outside[:5])}; "
                         "copy the files themselves")
    sealed = {**data, "files": manifest(folder)}
    return {**sealed, "digest": _digest(sealed)}


def damage(folder: Path, full: bool = False) -> str:
    """Why the output in `folder` cannot be reused ("" when it can): missing or unreadable result.json, an
    edited result.json, a file missing or of the wrong size, or (full) a file whose bytes changed."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return f"{path} is missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path} is unreadable ({err})"
    if not isinstance(data, dict) or "outputs" not in data:
        return f"{path} is not a step result"
    if "files" not in data:
        return ""  # written before outputs were sealed
    if data.get("digest") != _digest(data):
        return f"{path} was changed after the step wrote it"
    for name, (size, checksum) in data["files"].items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{file} is {actual:,} bytes, the step wrote {size:,}"
        if full and sha256(file) != checksum:
            return f"{file} changed after the step wrote it (checksum differs)"
    return ""
