"""`monitor`: compare new data with what a model was trained on; fail with a readable report when it drifted."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..base import CausalModelRef, Section, StepSpec
from ..data import CorpusSpec

JsonType = Literal["string", "number", "integer", "boolean", "array", "object", "null"]


class ThresholdsSpec(Section):
    """Limits that turn a finding into drift (null: the finding is reported, never fatal)."""

    schema_errors: int | None = Field(0, ge=0)
    """Most rows allowed with an expected field missing or of another type."""
    unknown_rate: float | None = Field(0.02, ge=0, le=1)
    """Most tokens of the new data allowed to be unknown (`<unk>`, or a lone non-ASCII byte in byte-level BPE)."""
    js_divergence: float | None = Field(0.2, ge=0, le=1)
    """Largest Jensen-Shannon divergence (base 2, 0..1) allowed between the unigram token distributions."""
    perplexity_ratio: float | None = Field(1.5, gt=0)
    """Largest ratio allowed of the model's perplexity on new data to its perplexity on the reference."""


class MonitorSpec(StepSpec):
    """Schema checks, token-distribution drift and perplexity of a model on new data against its training data."""

    produces: ClassVar[frozenset[str]] = frozenset({"report"})

    kind: Literal["monitor"]
    model: CausalModelRef
    """The model being watched, typically `models:/NAME@champion`; its tokenizer counts the tokens."""
    data: CorpusSpec
    """The new data (`files:` .jsonl/.txt globs or a `dataset`)."""
    reference: CorpusSpec
    """What the model was trained on (same forms, plus `builtin: pydoc`)."""
    fields: dict[str, JsonType] | None = None
    """Expected JSONL fields and JSON types; default: inferred from the reference's .jsonl rows, else {text_field: string}."""
    validation_perplexity: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*\.\S+$")
    """STEP.METRIC tag of the registered version holding its own held-out perplexity (e.g.
    `base_eval.val/perplexity`) to compare with; null: measure the model on `reference` instead."""
    sample: int = Field(500, ge=1)
    """Documents read from each side at most."""
    context: int = Field(128, ge=8)
    """Tokens per perplexity window."""
    windows: int = Field(16, ge=1)
    """Perplexity windows per side."""
    thresholds: ThresholdsSpec = ThresholdsSpec()
    """Limits that make the step fail."""
    on_drift: Literal["fail", "warn"] = "fail"
    """`fail`: a threshold crossed fails the step (and the scheduled run); `warn`: report it and finish."""


    def checks_rows(self, field: str) -> bool:
        return not field.startswith("data.")  # bad rows of the new data are what this step reports
