"""`finetune`: supervised fine-tuning (full or parameter-efficient) on instruction data, with a forgetting report."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import GenerativeModelRef, Ref, Section, TrainingStepSpec
from ..data import PackedBatches, PackingSpec, SftDataSpec
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


class FinetuneSpec(WritesTunedModel, PackedBatches, TrainingStepSpec):
    """Fine-tune a causal LM on prompt/completion data (loss on the completion only), fully or with peft; an
    encoder-decoder (t5) reads the prompt in its encoder and writes the completion with its decoder."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer", "metrics"})

    kind: Literal["finetune"]
    model: GenerativeModelRef
    """The model to fine-tune: a causal LM or an encoder-decoder."""
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
    packing: bool | PackingSpec = False
    """Pack several examples into each row so no compute goes to padding (true: `padding_free`, the same
    examples and loss per step), or a `{strategy, length}` section."""

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneSpec":
        if self.replay > 0 and self.tokens is None:
            raise ValueError("replay needs tokens: the tokenize step whose pretraining data to mix in")
        if problem := self.merge_problem() or self.packing_problem(kinds_with_bfd=True):
            raise ValueError(problem)
        if self.data.stream is True and self.replay > 0:
            raise ValueError("replay adds pretraining blocks to the loaded training rows, and data.stream: true "
                             "loads none: set data.stream to false (or auto), or replay to 0")
        if self.data.stream is True and (p := self.packing_spec()) is not None and p.strategy == "bfd":
            raise ValueError("packing.strategy bfd packs the whole training set once, and data.stream: true draws "
                             "rows as it trains: use padding_free")
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
        data = self.data.mixture_summary() if self.data.mixture else \
            f"builtin tasks x{self.data.n_per_task}" if self.data.builtin else \
            (f"data from step {self.data.step}" if self.data.step else f"{len(self.data.files)} file glob(s)")
        return {"peft": what, "data": data + (f", replay {self.replay:.0%}" if self.replay else "")}
