"""`reward_model`: train a scalar reward on preference pairs with the Bradley-Terry loss."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import CausalModelRef, OptimizerSpec, TrainingStepSpec
from ..peft import PeftSpec
from ..data import PackedBatches, PackingSpec, RewardDataSpec


class RewardModelSpec(PackedBatches, TrainingStepSpec):
    """A sequence-classification head with one output, trained so that r(chosen) > r(rejected)."""

    produces: ClassVar[frozenset[str]] = frozenset({"reward_model", "tokenizer"})

    kind: Literal["reward_model"]
    model: CausalModelRef
    """The model to start from (usually the fine-tuned policy); its LM head is replaced by a score head."""
    data: RewardDataSpec
    """Where the preference pairs come from (or the ratings, with a rated `sheet`)."""
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
    packing: bool | PackingSpec = False
    """Pack the chosen and rejected replies of each batch into as few rows as fit, so no compute goes to padding
    (true: `padding_free`; the same pairs and loss per step), or a `{strategy, length}` section."""

    @model_validator(mode="after")
    def _one_length(self) -> "RewardModelSpec":
        if problem := self.packing_problem():
            raise ValueError(problem)
        if self.epochs is not None and (self.max_steps is not None or self.max_tokens is not None):
            raise ValueError("give epochs or max_steps/max_tokens, not both")
        if self.data.stream is True and self.max_steps is None and self.max_tokens is None:
            raise ValueError("data.stream: true draws pairs as it trains and never counts them, so epochs cannot "
                             "be counted: give max_steps or max_tokens")
        if self.peft.method not in ("full", "lora", "bitfit"):
            raise ValueError(f"peft.method: reward models support full, lora or bitfit, got {self.peft.method!r}")
        sheet = self.data.sheet
        if sheet is not None and sheet.ties == "soft" and not self.soft_labels:
            raise ValueError("data.sheet.ties: soft trains on ties with p = 0.5, which needs soft_labels: true")
        if sheet is not None and sheet.pointwise() and (self.margin or self.center_coef):
            raise ValueError("margin and center_coef shape the pairwise loss; data.sheet.loss: mse trains on ratings")
        return self

    def input_globs(self) -> list[str]:
        """Input files, and a sheet's key file (editing it re-runs the step)."""
        key = self.data.sheet.key_file() if self.data.sheet is not None else None
        return super().input_globs() + ([key] if key else [])

