"""`tokenize`: train a tokenizer on a corpus and encode the corpus into token files."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import Section, StepSpec


BYTE_LEVEL_BASE = 256 + 5  # every byte, plus <s> </s> <unk> <pad> <mask>


class DatasetSource(Section):
    """A corpus read through the `datasets` library (a local folder works offline)."""

    path: str
    """Dataset name on the hub, a loader name (`json`, `text`) or a local folder."""
    name: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the text."""
    data_files: list[str] | None = None
    """Files for loader names such as `json` or `text`."""


class CorpusSpec(Section):
    """Where the text comes from: exactly one of `builtin`, `files` or `dataset`."""

    builtin: Literal["pydoc"] | None = None
    """A corpus that ships with Python: `pydoc` is the pydoc topics (~465 KB of English)."""
    files: list[str] | None = None
    """Globs of .txt files (documents separated by blank lines) or .jsonl files, relative to the spec."""
    text_field: str = "text"
    """Field holding the text in .jsonl rows."""
    dataset: DatasetSource | None = None
    """A `datasets` source."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "CorpusSpec":
        given = [k for k in ("builtin", "files", "dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of builtin, files, dataset (got {', '.join(given) or 'none'})")
        return self


class TokenizeSpec(StepSpec):
    """Train a tokenizer with the `tokenizers` library and encode the corpus into flat token files."""

    produces: ClassVar[frozenset[str]] = frozenset({"tokenizer", "tokens"})

    kind: Literal["tokenize"]
    corpus: CorpusSpec
    """The text to learn from and encode."""
    algorithm: Literal["bpe", "unigram", "wordpiece"] = "bpe"
    """Tokenization model: byte-level BPE (GPT-2, Llama), Unigram (T5) or WordPiece (BERT)."""
    vocab_size: int = Field(2048, ge=64, le=1_000_000)
    """Vocabulary size, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    """Merges/pieces seen fewer times than this are not learned."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of documents held out for validation (split by document, not by token)."""
    lowercase: bool = False
    """Lowercase text before tokenizing."""

    @model_validator(mode="after")
    def _room_for_merges(self) -> "TokenizeSpec":
        if self.algorithm == "bpe" and self.vocab_size < BYTE_LEVEL_BASE:
            raise ValueError(f"vocab_size {self.vocab_size} is too small for byte-level BPE: its 256 byte tokens "
                             f"and 5 special tokens come first; use at least {BYTE_LEVEL_BASE}")
        return self

    def input_globs(self) -> list[str]:
        return list(self.corpus.files or []) + list((self.corpus.dataset and self.corpus.dataset.data_files) or [])
