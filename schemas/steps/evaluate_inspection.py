"""Sections of `evaluate` that look inside a model: sentence embeddings and a linear probe, word analogies, the
Embedding Projector export, the high-dimension argument, and attention maps."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..base import InputFile
from ..section import Section

# "king - man + woman = queen": a - b + c should land nearest d (Mikolov et al. 2013)
ANALOGY = re.compile(r"^\s*(\S+)\s+-\s+(\S+)\s+\+\s+(\S+)\s+=\s+(\S+)\s*$")
FILE_ONLY = ("text_column", "label_column", "eval_fraction")
Index = Annotated[int, Field(ge=0)]


def parse_analogy(text: str) -> tuple[str, str, str, str]:
    """(a, b, c, expected) of "a - b + c = expected"."""
    found = ANALOGY.match(text)
    if found is None:
        raise ValueError(f"analogy {text!r}: expected the form 'a - b + c = d' (spaces around - + =), "
                         "e.g. 'king - man + woman = queen'")
    return found.groups()  # type: ignore[return-value]


class SentencesSpec(Section):
    """Sentence embeddings: the attention-mask-weighted mean of one layer's hidden states over each text's tokens
    (Sentence-BERT's mean pooling), a logistic-regression probe trained on them and scored on held-out texts
    against the majority class, and each query's nearest texts by cosine."""

    builtin: Literal["reviews"] | None = None
    """`reviews`: the one-line reviews of the builtin `sentiment` task ("Review: the soup was great."), labelled
    positive or negative; the probe trains on the task's training split and is scored on its held-out split
    (noun/adjective pairs no training review has)."""
    file: InputFile | None = None
    """A JSONL or CSV file of labelled texts, relative to the spec."""
    text_column: str = "text"
    """File only: the JSONL key or CSV header of the text."""
    label_column: str = "label"
    """File only: the JSONL key or CSV header of the label (any value; at least two distinct ones)."""
    eval_fraction: float = Field(0.3, gt=0, lt=1)
    """File only: share of the rows held out to score the probe (a seeded hash of each row)."""
    n_per_split: int = Field(100, ge=2)
    """Builtin only: distinct reviews per split at most (the held-out split has about 80)."""
    layer: int = -1
    """Hidden layer pooled: 0 the input embeddings, 1 the first block's output, ..., -1 the last."""
    queries: list[str] = []
    """Texts whose nearest texts of the set (cosine of pooled vectors) to list."""
    k: int = Field(3, ge=1, le=50)
    """Neighbours per query."""
    l2: float = Field(1.0e-3, ge=0)
    """Weight of the probe's L2 penalty: mean cross-entropy + l2 x sum of squared weights (features standardized
    on the training split)."""
    fresh_baseline: bool = True
    """Also pool and probe a freshly initialised model of the same config and seed: what training added."""

    @model_validator(mode="after")
    def _source(self) -> "SentencesSpec":
        if (self.builtin is None) == (self.file is None):
            raise ValueError("give exactly one of builtin (reviews) or file")
        wrong = sorted(set(FILE_ONLY) & self.model_fields_set) if self.builtin else \
            ["n_per_split"] if "n_per_split" in self.model_fields_set else []
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: {'file' if self.builtin else 'builtin'} only")
        return self


class ProjectorSpec(Section):
    """Export for the TensorBoard Embedding Projector: a `projector/` folder of vectors TSV, metadata TSV and
    `projector_config.pbtxt` (TensorBoard reads the folder as a log dir; projector.tensorflow.org's Load button
    takes a vectors file and its metadata file)."""

    tokens: int = Field(5000, ge=2)
    """The first non-special tokens of the vocabulary exported, at most."""


class DimensionsSpec(Section):
    """The high-dimension argument for adding vectors: random vectors are nearly orthogonal (mean |cos| of two
    Gaussian vectors ~ sqrt(2 / (pi d))), so a sum of a few of them still points at each one, and the corners
    of the d-dimensional hypercube number 2^d. One PNG of three panels, the model's own dimension marked."""

    dims: list[Annotated[int, Field(ge=1, le=16384)]] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    """Dimensions drawn."""
    pairs: int = Field(2000, ge=10, le=1_000_000)
    """Random pairs per dimension for the mean |cos|."""
    summed: int = Field(5, ge=1)
    """Random vectors added together in the superposition panel."""
    dictionary: int = Field(1000, ge=2)
    """Random vectors the summed ones are drawn from, and looked for among (by dot product with the sum)."""

    @model_validator(mode="after")
    def _sizes(self) -> "DimensionsSpec":
        if self.summed >= self.dictionary:
            raise ValueError(f"summed ({self.summed}) must be below dictionary ({self.dictionary})")
        return self


class AttentionSpec(Section):
    """Attention maps of chosen texts (a PNG per text: a grid of the chosen layers and heads) and each head's
    previous-token score, the mean attention weight from token i to token i - 1 (Olsson et al. 2022's
    previous-token heads), for the model and for a freshly initialised model of the same config and seed.
    Transformers only (mlp, rnn and lstm have no attention)."""

    texts: list[str] = Field(["The for statement is used to iterate over the elements of a sequence.",
                              "Return a new list containing all items from the iterable in ascending order."],
                             min_length=1)
    """Texts to draw and to score (each read after the start token)."""
    layers: list[Index] | None = None
    """Layers drawn, from 0 (null: all)."""
    heads: list[Index] | None = None
    """Heads drawn in each layer, from 0 (null: all); the scores cover every head."""
    max_tokens: int = Field(24, ge=2, le=128)
    """Tokens of each text drawn in its heatmaps (the first ones); the score reads the whole text."""
