"""`distill`: train a small student on a teacher's soft targets (Hinton et al. 2015), optionally on-policy (GKD)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from ..base import CausalModelRef, Ref, Section, TrainingStepSpec, is_external
from .pretrain import ModelSpec

TokensRef = Annotated[str, Ref("tokens", heldout=True)]
# A string is a reference, anything else a new model's section; only that branch's errors are reported (tags
# in brackets, like pydantic's own validator tags, are left out of error paths: schemas/pipeline.py).
Student = Annotated[Union[Annotated[ModelSpec, Tag("new[ModelSpec]")], Annotated[CausalModelRef, Tag("ref[str]")]],
                    Discriminator(lambda v: "ref[str]" if isinstance(v, str) else "new[ModelSpec]")]


class OnPolicySpec(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024): some batches are continuations the student samples."""

    lmbda: float = Field(0.5, ge=0, le=1)
    """Probability that a micro-batch's continuation is sampled from the student (TRL GKDTrainer's `lmbda`)."""
    max_new_tokens: int = Field(16, ge=1, le=1024)
    """Tokens the student samples after the prompt (the rest of the block: its first context - max_new_tokens)."""
    beta: float = Field(0.5, ge=0, le=1)
    """Generalized JSD mixture weight: 0 is KL(teacher||student), 1 is KL(student||teacher) (TRL's `beta`)."""


class LatencySpec(Section):
    """How generation latency is compared (median of greedy generations that never stop early)."""

    prompt: str = "The "
    """Prompt for the latency measurement."""
    new_tokens: int = Field(32, ge=1)
    """Tokens generated per measurement."""
    repeats: int = Field(3, ge=1)
    """Measurements per model after one warm-up; the median is reported."""


class DistillSpec(TrainingStepSpec):
    """Distil a causal teacher into a smaller student on a tokenize step's tokens; compare with a hard-label twin."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})

    kind: Literal["distill"]
    teacher: CausalModelRef
    """The causal LM whose next-token distributions the student learns (frozen)."""
    student: Student
    """A new causal model (a `model:` section as in pretrain, built on `tokenizer`) or a reference to one."""
    tokenizer: TokensRef
    """The tokenize step whose training tokens feed both students and whose held-out split scores all three
    models; its tokenizer must be the teacher's."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of both distributions in the soft term (the hard term and every report use T=1)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the soft term: loss = alpha * T^2 * divergence + (1 - alpha) * cross-entropy on the data."""
    on_policy: OnPolicySpec | None = None
    """Also distil on continuations the student samples; every batch's divergence is then the generalized JSD with
    `beta` (null: data batches only, KL(teacher||student))."""
    baseline: bool = True
    """Also train the same student (same initial weights, data, steps, optimizer) on hard labels only."""
    latency: LatencySpec = LatencySpec()
    """How the student's and the teacher's generation latency are measured."""
    log_model: bool = True
    """Also log the distilled student to the step's MLflow run (transformers flavor)."""

    @model_validator(mode="after")
    def _consistent(self) -> "DistillSpec":
        if isinstance(self.student, ModelSpec) and self.student.family not in ("llama", "gpt2"):
            raise ValueError(f"student.family '{self.student.family}': distill trains a causal transformer "
                             "student (llama or gpt2); a masked or pre-transformer family is not supported yet")
        if self.on_policy is not None:
            if self.alpha == 0:
                raise ValueError("on_policy needs alpha > 0: sampled continuations have no hard labels, so "
                                 "alpha 0 gives them no loss")
            if isinstance(self.student, ModelSpec) and self.on_policy.max_new_tokens >= self.student.context:
                raise ValueError(f"on_policy.max_new_tokens ({self.on_policy.max_new_tokens}) must be below "
                                 f"student.context ({self.student.context}): the prompt is the rest of the block")
        return self

    def plan_details(self) -> dict:
        student = self.student if isinstance(self.student, str) else \
            f"new {self.student.family} layers={self.student.layers} hidden={self.student.hidden}"
        policy = "" if self.on_policy is None else \
            f", on-policy lmbda={self.on_policy.lmbda} beta={self.on_policy.beta}"
        return {"distill": f"{self.teacher} -> {student}: T={self.temperature} alpha={self.alpha}{policy}",
                "baseline": "hard-label twin, same steps" if self.baseline else "none"}

    def tokenizer_problems(self, steps: dict) -> list[tuple[tuple, str]]:
        """(field, message) for a teacher or student of this pipeline trained on another tokenize step's tokenizer."""
        from ..contracts import heldout_tokens

        problems = []
        own = steps.get(self.tokenizer)
        for field in ("teacher", "student"):
            ref = getattr(self, field)
            found = heldout_tokens(steps, ref) if isinstance(ref, str) and not is_external(ref) else None
            other = steps.get(found) if found else None
            if other is None or own is None or found == self.tokenizer or \
                    other.model_dump(exclude={"trainer", "run_on"}) == own.model_dump(exclude={"trainer", "run_on"}):
                continue  # unknown here (checked when the step starts), the same step, or the same settings
            problems.append(((field,), f"{field} '{ref}' was trained on the tokenizer of step '{found}', but this "
                                       f"step's tokenizer is '{self.tokenizer}'; teacher and student must share a "
                                       "tokenizer (the loss compares their distributions token id by token id): set "
                                       f"tokenizer: {found}, or use a {field} trained on '{self.tokenizer}'"))
        return problems
