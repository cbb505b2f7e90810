"""Corpora document by document: the pydoc topics that ship with Python, .txt/.jsonl files, `datasets` sources.

Streamed (a corpus is never held whole); used by `tokenize` and by `monitor` (for the data it compares).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

from components.lib.io import expand, iter_jsonl
from schemas.data import CorpusSpec, DatasetSource


def iter_documents(corpus: CorpusSpec, resolve: Callable[[str], Path]) -> Iterator[str]:
    """Yield the corpus one document at a time, never holding it whole."""
    if corpus.builtin == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif corpus.files is not None:
        for path in expand(corpus.files, resolve, "corpus.files"):
            yield from (jsonl_documents(path, corpus.text_field) if path.suffix == ".jsonl" else text_documents(path))
    else:
        yield from dataset_documents(corpus.dataset, resolve)


def dataset_documents(src: DatasetSource, resolve: Callable[[str], Path]) -> Iterator[str]:
    """Rows of a `datasets` source; local paths and data_files are relative to the spec, like every path."""
    import datasets

    local = resolve(src.path)
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():  # a save_to_disk folder
        ds = datasets.load_from_disk(str(local))  # memory-mapped Arrow, not read into memory
        ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        files = [str(resolve(f)) for f in src.data_files] if src.data_files else None
        ds = datasets.load_dataset(str(local) if local.exists() else src.path, src.name, split=src.split,
                                   data_files=files, streaming=True)
    for n, row in enumerate(ds):
        if src.text_field not in row:
            raise ValueError(f"corpus.dataset: row {n} has no '{src.text_field}' column (set "
                           f"corpus.dataset.text_field); columns: {', '.join(row)}")
        yield str(row[src.text_field])


def text_documents(path: Path) -> Iterator[str]:
    """Documents of a .txt file are blocks separated by blank lines."""
    block: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
    if block:
        yield "".join(block)


def jsonl_documents(path: Path, field: str) -> Iterator[str]:
    """The `field` of each row of a JSONL file (errors name file:line)."""
    for n, row, error in iter_jsonl(path):
        if error:
            raise ValueError(f"{path}:{n}: {error}")
        if not isinstance(row, dict) or field not in row:
            have = ", ".join(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
            raise ValueError(f"{path}:{n}: row has no '{field}' field (set corpus.text_field); got {have}")
        yield str(row[field])


def is_validation(index: int, seed: int, fraction: float) -> bool:
    """Split by document with a seeded hash, so the split is stable and independent of corpus order."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction
