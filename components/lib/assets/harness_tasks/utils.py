"""Datasets of llmcycle's lm-evaluation-harness tasks, read from files that ship with llmcycle and Python.

Offline by construction: no hub download. The harness calls these through each task's `custom_dataset`,
with the task's `metadata` as keyword arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _jsonl(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def sentiment(**_) -> datasets.DatasetDict:
    """Held-out rows of the builtin `sentiment` task (seed 0): review -> positive / negative."""
    return _jsonl("sentiment.jsonl")


def polite(**_) -> datasets.DatasetDict:
    """Held-out rows of the builtin `polite` task (seed 0): which of two requests is polite, A or B."""
    return _jsonl("polite.jsonl")


def pydoc(seed: int = 0, val_fraction: float = 0.1, **_) -> datasets.DatasetDict:
    """The pydoc topics a `tokenize` step with this seed and val_fraction holds out (the quickstart's split)."""
    from pydoc_data.topics import topics

    from components.lib.corpus import is_validation

    docs = [{"topic": key, "text": topics[key]} for i, key in enumerate(sorted(topics))
            if is_validation(i, seed, val_fraction)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
