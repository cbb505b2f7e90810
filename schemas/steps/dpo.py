"""`dpo`: direct preference optimisation on {prompt, chosen, rejected} pairs against a frozen reference."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import CausalModelRef, TrainingStepSpec
from ..peft import PeftSpec, WritesTunedModel
from ..data import PackedBatches, PackingSpec, PreferenceDataSpec


class DpoSpec(WritesTunedModel, PackedBatches, TrainingStepSpec):
    """Direct preference optimisation (Rafailov et al. 2023): raise log π/π_ref of chosen over rejected."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer"})

    kind: Literal["dpo"]
    model: CausalModelRef
    """The policy to align (usually an SFT model); it is also the frozen reference unless `reference` is set."""
    reference: CausalModelRef | None = None
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
    packing: bool | PackingSpec = False
    """Pack several examples into each row so no compute goes to padding (true: `padding_free`: the chosen and
    rejected replies of each batch packed, the same pairs and loss per step), or a `{strategy, length}` section."""

    @model_validator(mode="after")
    def _consistent(self) -> "DpoSpec":
        if problem := self.merge_problem() or self.packing_problem():
            raise ValueError(problem)
        if self.reference is not None and self.reference == self.model:
            raise ValueError("reference is the same as model; leave reference out to use the starting policy")
        return self

    def outputs(self) -> frozenset[str]:
        return frozenset(self.tuned_outputs())

    def plan_details(self) -> dict:
        data = self.data.mixture_summary() if self.data.mixture else "builtin preferences" if self.data.builtin else \
            (f"preferences from step {self.data.step}" if self.data.step else f"{len(self.data.files)} file glob(s)")
        ref = self.reference or ("adapter disabled" if self.peft.is_adapter else "frozen copy of model")
        return {"dpo": f"beta={self.beta}, reference: {ref}", "data": data}
