"""`reward_model`: train a scalar reward on preference pairs with the Bradley-Terry loss."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, OptimizerSpec, Ref, Section, TrainingStepSpec
from ..peft import PeftSpec


class PreferenceDataSpec(Section):
    """Preference pairs: exactly one of `files`, `builtin` or `step`."""

    files: list[str] | None = None
    """Globs of JSONL files with rows {prompt, chosen, rejected, score?} (or chat message lists)."""
    eval_files: list[str] | None = None
    """Globs of held-out JSONL files; default: hold out `eval_fraction` of the training rows."""
    builtin: Literal["preferences"] | None = None
    """`preferences`: correct vs corrupted answers on the task mixture, polite vs rude wording."""
    step: Annotated[str | None, Ref("data")] = None
    """A step whose data output holds `preferences.jsonl` (e.g. a constitutional step)."""
    tasks: list[str] | None = None
    """Builtin only: which tasks of the mixture to draw pairs from (default: all but `add`)."""
    n_per_task: int = Field(200, ge=1)
    """Builtin only: training pairs per task (held-out pairs: a quarter of that)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of rows held out when no `eval_files` are given."""
    max_length: int = Field(256, ge=8)
    """Prompt plus response tokens kept per sequence (the prompt is cut from the left)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreferenceDataSpec":
        given = [k for k in ("files", "builtin", "step") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of files, builtin, step (got {', '.join(given) or 'none'})")
        if self.eval_files is not None and self.files is None:
            raise ValueError("eval_files goes with files")
        return self


class RewardModelSpec(TrainingStepSpec):
    """A sequence-classification head with one output, trained so that r(chosen) > r(rejected)."""

    produces: ClassVar[frozenset[str]] = frozenset({"reward_model", "model", "tokenizer"})

    kind: Literal["reward_model"]
    model: ModelRef
    """The model to start from (usually the fine-tuned policy); its LM head is replaced by a score head."""
    data: PreferenceDataSpec
    """Where the preference pairs come from."""
    peft: PeftSpec = PeftSpec(method="full")
    """Which weights train: `full`, `lora` (merged into the saved folder) or `bitfit`; the score head always trains."""
    optimizer: OptimizerSpec = OptimizerSpec(lr=1e-4)
    """Optimizer; reward models like a smaller learning rate than pretraining."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training pairs (alternative to max_steps/max_tokens; default 1)."""
    margin: float = Field(0.0, ge=0)
    """Required reward gap m in −log σ(r_c − r_r − m)."""
    center_coef: float = Field(0.0, ge=0)
    """Weight of the mean((r_c + r_r)²) term that keeps rewards centred (0.01 in TRL's docs)."""
    soft_labels: bool = True
    """Use each row's `score` p as a soft label: −[p·log σ(Δ) + (1−p)·log σ(−Δ)]."""

    @model_validator(mode="after")
    def _one_length(self) -> "RewardModelSpec":
        if self.epochs is not None and (self.max_steps is not None or self.max_tokens is not None):
            raise ValueError("give epochs or max_steps/max_tokens, not both")
        if self.peft.method not in ("full", "lora", "bitfit"):
            raise ValueError(f"peft.method: reward models support full, lora or bitfit, got {self.peft.method!r}")
        return self

    def input_globs(self) -> list[str]:
        return list(self.data.files or []) + list(self.data.eval_files or [])
