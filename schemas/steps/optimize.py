"""`optimize`: merge adapters, prune by magnitude, quantize to int8 for CPU serving; measure before and after."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from ..base import CausalModelRef, Ref, Section, StepSpec


class PruneSpec(Section):
    """Magnitude (L1) pruning of the Linear weights inside the transformer blocks (the LM head is kept)."""

    sparsity: float = Field(gt=0, lt=1)
    """Fraction of those weights set to zero."""
    scope: Literal["global", "layer"] = "global"
    """`global`: smallest weights across all layers together; `layer`: the same fraction in every layer."""


class MeasureSpec(Section):
    """How the variants are compared: held-out perplexity, generation latency and size on disk."""

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

    produces: ClassVar[frozenset[str]] = frozenset({"model", "quantized"})

    kind: Literal["optimize"]
    model: CausalModelRef
    """The model to optimize (a peft adapter folder is merged into its base)."""
    adapter: Annotated[str, Ref("adapter")] | None = None
    """A step whose LoRA adapter is merged into `model` first (null: `model` is used as is)."""
    prune: PruneSpec | None = None
    """Magnitude pruning (null: none)."""
    quantize: Literal["int8", "none"] = "int8"
    """`int8`: dynamic int8 quantization of every Linear layer (torch.ao.quantization.quantize_dynamic)."""
    measure: MeasureSpec = MeasureSpec()
    """How the variants are compared."""

    def outputs(self) -> frozenset[str]:
        return frozenset({"model"} | ({"quantized"} if self.quantize == "int8" else set()))

    def why_no(self, output: str) -> str:
        return "quantize is none" if output == "quantized" else ""

    def plan_details(self) -> dict[str, str]:
        chain = (["merge adapter"] if self.adapter else []) + \
                ([f"prune {self.prune.sparsity:.0%} ({self.prune.scope})"] if self.prune else []) + \
                (["int8 dynamic quantization"] if self.quantize == "int8" else [])
        return {"optimizations": " -> ".join(chain) or "none (measure only)"}
