"""`tokenize`: train a tokenizer on a corpus and encode the corpus into token files."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import StepSpec
from ..data import CorpusSpec


BYTE_LEVEL_BASE = 256 + 4  # every byte, plus </s> (BOS and EOS), <unk>, <pad>, <mask>


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
                             f"and 4 special tokens come first; use at least {BYTE_LEVEL_BASE}")
        return self

