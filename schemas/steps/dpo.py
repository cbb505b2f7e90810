"""`dpo`: direct preference optimisation on {prompt, chosen, rejected} pairs against a frozen reference."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, Ref, Section, TrainingStepSpec
from ..peft import PeftSpec

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


class DpoSpec(TrainingStepSpec):
    """Direct preference optimisation (Rafailov et al. 2023): raise log π/π_ref of chosen over rejected."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer"})

    kind: Literal["dpo"]
    model: ModelRef
    """The policy to align (usually an SFT model); it is also the frozen reference unless `reference` is set."""
    reference: ModelRef | None = None
    """A different frozen reference model (default: the starting policy; for adapters, the adapter disabled)."""
    data: PreferenceDataSpec
    """Training (and held-out) preference pairs."""
    beta: float = Field(0.1, gt=0, le=10)
    """Strength of the implicit KL penalty: larger keeps the policy closer to the reference (0.1 in most recipes)."""
    soft_labels: bool = True
    """Use a row's `score` (probability that chosen is better) as a soft label; false: every pair counts as 1."""
    peft: PeftSpec = PeftSpec()
    """Which parameters train."""
    merge: bool | None = None
    """Also write a merged standalone model (default: yes, except prompt_tuning)."""

    @model_validator(mode="after")
    def _consistent(self) -> "DpoSpec":
        if self.merge and self.peft.method == "prompt_tuning":
            raise ValueError("prompt_tuning cannot be merged (virtual tokens have no weight form); set merge: false")
        if self.reference is not None and self.reference == self.model:
            raise ValueError("reference is the same as model; leave reference out to use the starting policy")
        return self

    @property
    def merged(self) -> bool:
        """Whether a standalone `model` folder is written."""
        return self.peft.method != "prompt_tuning" if self.merge is None else self.merge

    def input_globs(self) -> list[str]:
        return list(self.data.files or []) + list(self.data.eval_files or [])

    def plan_details(self) -> dict:
        data = "builtin preferences" if self.data.builtin else \
            (f"preferences from step {self.data.step}" if self.data.step else f"{len(self.data.files)} file glob(s)")
        ref = self.reference or ("adapter disabled" if self.peft.is_adapter else "frozen copy of model")
        return {"dpo": f"beta={self.beta}, reference: {ref}", "data": data}
