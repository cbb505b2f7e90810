"""`optimize`: merge adapters, prune by magnitude, write bf16/fp16/int8/int4 variants; measure before and after."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Field, WithJsonSchema, field_validator

from ..base import CausalModelRef, Ref, Section, StepSpec

Variant = Literal["bf16", "fp16", "int8", "int4"]
VARIANTS: tuple[str, ...] = get_args(Variant)
# Written as one name, a list, or `none`; validated as a list (so a wrong name is one error, not one per form).
Variants = Annotated[list[Variant], WithJsonSchema({"anyOf": [
    {"type": "string", "enum": [*VARIANTS, "none"]},
    {"type": "array", "items": {"type": "string", "enum": list(VARIANTS)}, "uniqueItems": True}]})]


class PruneSpec(Section):
    """Magnitude (L1) pruning of the Linear weights inside the transformer blocks (the LM head is kept)."""

    sparsity: float = Field(gt=0, lt=1)
    """Fraction of those weights set to zero."""
    scope: Literal["global", "layer"] = "global"
    """`global`: smallest weights across all layers together; `layer`: the same fraction in every layer."""


class MeasureSpec(Section):
    """How the variants are compared: held-out perplexity, generation latency, size on disk and in memory."""

    tokens: Annotated[str, Ref("tokens", heldout=True)] | None = None
    """A tokenize step whose `val` split gives held-out perplexity (null: skip perplexity)."""
    context: int = Field(128, ge=8)
    """Tokens per perplexity window."""
    batches: int = Field(4, ge=1)
    """Batches of held-out windows."""
    batch_size: int = Field(8, ge=1)
    """Windows per batch."""
    prompt: str = "The "
    """Prompt for the latency measurement."""
    new_tokens: int = Field(32, ge=1)
    """Tokens generated (greedily, never stopping early) per latency measurement."""
    repeats: int = Field(3, ge=1)
    """Latency measurements per variant after one warm-up; the median is reported."""


class OptimizeSpec(StepSpec):
    """Make a model cheaper to serve and show what it cost: size, latency per token, perplexity."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", *VARIANTS})

    kind: Literal["optimize"]
    model: CausalModelRef
    """The model to optimize (a peft adapter folder is merged into its base)."""
    adapter: Annotated[str, Ref("adapter")] | None = None
    """A step whose LoRA adapter is merged into `model` first (null: `model` is used as is)."""
    prune: PruneSpec | None = None
    """Magnitude pruning (null: none)."""
    quantize: Variants = ["int8"]
    """Lower-precision variants of the (merged, pruned) model, each written to the folder and output of its name
    and measured beside it: `bf16`/`fp16` (the whole model cast), `int8` (torchao weight-only int8, float32
    activations), `int4` (torchao weight-only int4 in groups, bf16 activations); one name, a list, or `none`."""
    measure: MeasureSpec = MeasureSpec()
    """How the variants are compared."""

    @field_validator("quantize", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [] if value == "none" else [value] if isinstance(value, str) else value

    @field_validator("quantize")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError(f"quantize lists a variant twice, got {value}")
        return value

    def outputs(self) -> frozenset[str]:
        return frozenset({"model", *self.quantize})

    def why_no(self, output: str) -> str:
        return f"quantize does not list {output}" if output in VARIANTS else ""

    def plan_details(self) -> dict[str, str]:
        chain = (["merge adapter"] if self.adapter else []) + \
                ([f"prune {self.prune.sparsity:.0%} ({self.prune.scope})"] if self.prune else []) + \
                ([f"quantize {', '.join(self.quantize)}"] if self.quantize else [])
        return {"optimizations": " -> ".join(chain) or "none (measure only)"}
