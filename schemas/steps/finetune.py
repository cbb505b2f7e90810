"""`finetune`: supervised fine-tuning (full or parameter-efficient) on instruction data, with a forgetting report."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import CausalModelRef, Ref, Section, TrainingStepSpec
from ..data import SftDataSpec
from ..peft import QuantizedBasePeftSpec, WritesTunedModel

TokensRef = Annotated[str, Ref("tokens", heldout=True)]


class TaskEvalSpec(Section):
    """Exact-match task accuracy and pretraining perplexity of the base and the tuned model."""

    shots: int = Field(3, ge=0, le=32)
    """In-context examples (from the training rows of the same task) for the few-shot score; 0: skip it."""
    base: bool = True
    """Also score the model before fine-tuning (the baseline, and the forgetting delta)."""
    max_new_tokens: int = Field(24, ge=1, le=1024)
    """Longest generated answer."""
    perplexity_batches: int = Field(8, ge=1)
    """Batches of pretraining validation tokens for the forgetting perplexity."""


class FinetuneSpec(WritesTunedModel, TrainingStepSpec):
    """Fine-tune a causal LM on prompt/completion data (loss on the completion only), fully or with peft."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer", "metrics"})

    kind: Literal["finetune"]
    model: CausalModelRef
    """The model to fine-tune."""
    data: SftDataSpec
    """Training (and held-out) instruction data."""
    peft: QuantizedBasePeftSpec = QuantizedBasePeftSpec()
    """Which parameters train (and, for LoRA, whether the frozen base is held in 4 bits: QLoRA)."""
    tokens: TokensRef | None = None
    """A `tokenize` step whose token files feed `replay` and the forgetting perplexity (validation split)."""
    replay: float = Field(0.0, ge=0, lt=1)
    """Share of training examples that are pretraining blocks from `tokens` (a defence against forgetting)."""
    merge: bool | None = None
    """Also write a merged standalone model (default: yes, except prompt_tuning, which has no weight form)."""
    evaluation: TaskEvalSpec | None = TaskEvalSpec()
    """After training, score base and tuned model on the held-out rows (null: skip)."""

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneSpec":
        if self.replay > 0 and self.tokens is None:
            raise ValueError("replay needs tokens: the tokenize step whose pretraining data to mix in")
        if problem := self.merge_problem():
            raise ValueError(problem)
        return self

    def trainer_problems(self, trainer) -> list[tuple[tuple, str]]:
        if self.peft.quantize_base is None:
            return []
        if trainer.accelerator in ("cpu", "mps"):
            return [(("peft", "quantize_base"), f"quantize_base: {self.peft.quantize_base} (QLoRA's 4-bit base, "
                     f"bitsandbytes) needs a CUDA GPU, and this step runs on accelerator '{trainer.accelerator}': set "
                     "trainer.accelerator to gpu (or auto on a GPU machine), or remove quantize_base for plain LoRA")]
        if trainer.strategy.startswith(("fsdp", "deepspeed")):
            return [(("peft", "quantize_base"), f"quantize_base (QLoRA) trains with one GPU per process (ddp), "
                     f"got strategy '{trainer.strategy}'; use ddp or a single device")]
        return []

    def reads_heldout(self, path: tuple, ref: Ref) -> bool:
        return ref.heldout and self.evaluation is not None  # the forgetting perplexity; replay reads `train`

    def outputs(self) -> frozenset[str]:
        return frozenset(self.tuned_outputs() | {"metrics"})

    def plan_details(self) -> dict:
        p = self.peft
        what = {"lora": f"lora r={p.r} alpha={p.alpha}" + (" rslora" if p.use_rslora else "")
                + (" dora" if p.use_dora else "") + (f" on a {p.quantize_base} base" if p.quantize_base else ""),
                "prompt_tuning": f"prompt_tuning {p.num_virtual_tokens} tokens",
                "prune": f"prune to {p.sparsity:.0%} sparsity"}.get(p.method, p.method)
        data = f"builtin tasks x{self.data.n_per_task}" if self.data.builtin else \
            (f"data from step {self.data.step}" if self.data.step else f"{len(self.data.files)} file glob(s)")
        return {"peft": what, "data": data + (f", replay {self.replay:.0%}" if self.replay else "")}
