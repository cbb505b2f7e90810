"""Data sections shared by several step kinds."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .base import Ref, Section

# Kept in step with components.preferences.DEFAULT_TASKS and components.tasks.TASKS.
PREFERENCE_TASKS = ("copy", "reverse", "capitalize", "count", "larger", "add", "sentiment", "polite")


class PreferenceDataSpec(Section):
    """Preference pairs: exactly one of `files`, `builtin` or `step`."""

    files: list[str] | None = None
    """Globs of JSONL files (relative to the spec) with {prompt, chosen, rejected, score?} rows (text or chat)."""
    eval_files: list[str] | None = None
    """Globs of held-out JSONL files in the same format (default: eval_fraction of the training rows)."""
    builtin: Literal["preferences"] | None = None
    """`preferences`: correct vs near-miss answers on the task mixture, and polite vs rude wording."""
    tasks: list[Literal[PREFERENCE_TASKS]] | None = None  # type: ignore[valid-type]
    """Builtin: which tasks to draw pairs from (default: all but `add`)."""
    n_per_task: int = Field(200, ge=1, le=1_000_000)
    """Builtin: training pairs per task."""
    step: Annotated[str | None, Ref("data")] = None
    """A step whose data output holds `preferences.jsonl` (e.g. a `constitutional` step)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the pairs held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per prompt + reply (the prompt is cut from the left, then the reply from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreferenceDataSpec":
        given = [k for k in ("files", "builtin", "step") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of files, builtin, step (got {', '.join(given) or 'none'})")
        if self.eval_files is not None and self.files is None:
            raise ValueError("eval_files goes with files")
        builtin_only = {"tasks", "n_per_task"} & self.model_fields_set
        if builtin_only and self.builtin is None:
            raise ValueError(f"{', '.join(sorted(builtin_only))} apply to builtin: preferences only")
        return self
