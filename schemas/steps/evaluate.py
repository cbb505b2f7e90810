"""`evaluate`: perplexity and next-token accuracy, prompted tasks, decoding samples and embeddings of a model."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, Ref, Section, StepSpec, TaskFile
from ..data import BuiltinTask

TokensRef = Annotated[str, Ref("tokens", heldout=True)]


class TaskExample(Section):
    """One question of a prompted task."""

    prompt: str
    """Text the model continues."""
    answer: str
    """The correct continuation (for choice tasks: one of `choices`)."""
    choices: list[str] | None = None
    """Candidate continuations, scored by log-likelihood (multiple choice)."""


class TaskSpec(Section):
    """A prompted task: multiple choice by log-likelihood, or exact match of a generated answer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Task name (metrics are `tasks/<k>shot/<name>`)."""
    type: Literal["choice", "exact_match"] = "choice"
    """`choice`: pick the choice with the highest log-likelihood; `exact_match`: generate greedily and compare."""
    examples: list[TaskExample] | None = None
    """Examples written in the spec."""
    file: TaskFile | None = None
    """A JSONL file of examples (`prompt`, `answer`, optional `choices`), relative to the spec."""
    max_new_tokens: int = Field(16, ge=1)
    """Tokens to generate for exact_match."""

    @model_validator(mode="after")
    def _source(self) -> "TaskSpec":
        if (self.examples is None) == (self.file is None):
            raise ValueError(f"task '{self.name}': give exactly one of examples or file")
        for i, ex in enumerate(self.examples or []):
            if self.type == "choice" and (not ex.choices or ex.answer not in ex.choices):
                raise ValueError(f"task '{self.name}' example {i}: a choice task needs choices that include the answer")
        return self


class TasksSpec(Section):
    """Prompted evaluation: tasks defined here or in JSONL, and the builtin task mixture."""

    items: list[TaskSpec] = []
    """Tasks defined in the spec or in JSONL files."""
    builtin: Literal["tasks"] | None = None
    """`tasks`: the project's builtin task mixture (components/lib/tasks.py), scored by exact match."""
    tasks: list[BuiltinTask] | None = None
    """Builtin only: which tasks of the mixture (default: all)."""
    n_per_task: int = Field(8, ge=1)
    """Examples per builtin task."""
    shots: int = Field(0, ge=0, le=32)
    """Solved examples of the same task put before each question (0: zero-shot)."""
    separator: str = "\n\n"
    """Text between the few-shot examples and the question."""


class GenerationSpec(Section):
    """Sample continuations of prompts with each decoding strategy."""

    prompts: list[str] = Field(min_length=1)
    """Prompts to continue."""
    strategies: list[Literal["greedy", "sample", "top_k", "top_p", "beam"]] = \
        ["greedy", "sample", "top_k", "top_p", "beam"]
    """Decoding strategies to compare."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Tokens to generate per prompt."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature for the sampling strategies."""
    top_k: int = Field(20, ge=1)
    """k of top-k sampling."""
    top_p: float = Field(0.9, gt=0, le=1)
    """p of nucleus (top-p) sampling."""
    num_beams: int = Field(4, ge=1)
    """Beams of beam search."""
    length_penalty: float = 1.0
    """Beam scores are sum(log p) / length^length_penalty (0: raw sum)."""


class EmbeddingsSpec(Section):
    """Inspect the input embeddings: nearest tokens and a 2-D projection."""

    words: list[str] = []
    """Words whose nearest tokens (cosine similarity) to list."""
    k: int = Field(5, ge=1, le=100)
    """Neighbours per word."""
    plot_tokens: int = Field(300, ge=2)
    """Tokens drawn in the 2-D PCA projection (the first ids after the specials)."""


class EvaluateSpec(StepSpec):
    """Measure a model: perplexity, next-token and masked-token accuracy, tasks, decoding, embeddings."""

    produces: ClassVar[frozenset[str]] = frozenset({"metrics"})

    kind: Literal["evaluate"]
    model: ModelRef
    """The model to evaluate."""
    tokens: TokensRef | None = None
    """A tokenize step whose held-out (`val`) token file to score."""
    split: Literal["val", "train"] = "val"
    """Which token file of `tokens` to score."""
    texts: list[str] | None = None
    """Texts to score instead of (or besides) token files."""
    context: int | None = Field(None, ge=8)
    """Block length for scoring (null: the model's maximum, at most 512)."""
    batch_size: int = Field(8, ge=1)
    """Blocks per forward pass."""
    max_batches: int = Field(16, ge=1)
    """Batches of blocks scored at most."""
    tasks: TasksSpec | None = None
    """Prompted tasks (null: none)."""
    generation: GenerationSpec | None = None
    """Decoding samples (null: none; causal models only)."""
    embeddings: EmbeddingsSpec | None = None
    """Embedding inspection (null: none)."""

    def reads_heldout(self, path: tuple, ref: Ref) -> bool:
        return ref.heldout and self.split == "val"

