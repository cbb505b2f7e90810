"""`finetune`: supervised fine-tuning (full or parameter-efficient) on instruction data, with a forgetting report."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, Ref, Section, TrainingStepSpec
from ..peft import PeftSpec

# Kept in step with components.tasks.TASKS (a test checks): schemas may not import components.
BUILTIN_TASKS = ("copy", "reverse", "capitalize", "count", "larger", "add", "sentiment", "polite")
TokensRef = Annotated[str, Ref("tokens")]


class SftDataSpec(Section):
    """Instruction data: exactly one of `files`, `builtin` or `step`."""

    files: list[str] | None = None
    """Globs of JSONL files (relative to the spec) with {prompt, completion} or {messages: [...]} rows."""
    eval_files: list[str] | None = None
    """Globs of held-out JSONL files in the same formats (default: eval_fraction of the training rows)."""
    builtin: Literal["tasks"] | None = None
    """`tasks`: the project's templated task mixture, with held-out combinations for evaluation."""
    tasks: list[Literal[BUILTIN_TASKS]] | None = None  # type: ignore[valid-type]
    """Subset of the builtin tasks (default: all)."""
    n_per_task: int = Field(300, ge=1, le=1_000_000)
    """Builtin: training examples per task."""
    eval_per_task: int = Field(40, ge=1, le=100_000)
    """Builtin: held-out examples per task."""
    step: Annotated[str | None, Ref("data")] = None
    """A step whose data output holds `sft.jsonl`."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the rows held out for evaluation when no eval_files are given (files and step data)."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt cut from the left, then the completion from the right)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "SftDataSpec":
        given = [k for k in ("files", "builtin", "step") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of files, builtin, step (got {', '.join(given) or 'none'})")
        if self.eval_files is not None and self.files is None:
            raise ValueError("eval_files goes with files")
        builtin_only = {"tasks", "n_per_task", "eval_per_task"} & self.model_fields_set
        if builtin_only and self.builtin is None:
            raise ValueError(f"{', '.join(sorted(builtin_only))} apply to builtin: tasks only")
        return self


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


class FinetuneSpec(TrainingStepSpec):
    """Fine-tune a causal LM on prompt/completion data (loss on the completion only), fully or with peft."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "tokenizer"})

    kind: Literal["finetune"]
    model: ModelRef
    """The model to fine-tune."""
    data: SftDataSpec
    """Training (and held-out) instruction data."""
    peft: PeftSpec = PeftSpec()
    """Which parameters train."""
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
        if self.merge and self.peft.method == "prompt_tuning":
            raise ValueError("prompt_tuning cannot be merged (virtual tokens have no weight form); set merge: false")
        return self

    @property
    def merged(self) -> bool:
        """Whether a standalone `model` folder is written."""
        return self.peft.method != "prompt_tuning" if self.merge is None else self.merge

    def input_globs(self) -> list[str]:
        return list(self.data.files or []) + list(self.data.eval_files or [])

    def plan_details(self) -> dict:
        p = self.peft
        what = {"lora": f"lora r={p.r} alpha={p.alpha}" + (" rslora" if p.use_rslora else "")
                + (" dora" if p.use_dora else ""), "prompt_tuning": f"prompt_tuning {p.num_virtual_tokens} tokens",
                "prune": f"prune to {p.sparsity:.0%} sparsity"}.get(p.method, p.method)
        data = f"builtin tasks x{self.data.n_per_task}" if self.data.builtin else \
            (f"data from step {self.data.step}" if self.data.step else f"{len(self.data.files)} file glob(s)")
        return {"peft": what, "data": data + (f", replay {self.replay:.0%}" if self.replay else "")}
