"""`peft:` the parameter-efficient fine-tuning section shared by finetune, reward_model, dpo and constitutional."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section

METHOD_FIELDS = {
    "lora": {"r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora", "quantize_base"},
    "ia3": {"target_modules", "feedforward_modules"},
    "prompt_tuning": {"num_virtual_tokens", "init_text"},
    "prune": {"sparsity"},
    "full": set(),
    "bitfit": set(),
}
ADAPTER_METHODS = frozenset({"lora", "ia3", "prompt_tuning"})


class PeftSpec(Section):
    """Which parameters train: all (`full`), a peft adapter, biases and norms only, or a pruned model."""

    method: Literal["full", "lora", "prompt_tuning", "ia3", "bitfit", "prune"] = "lora"
    """`full` (every weight), `lora` (low-rank adapters, Hu et al. 2021), `prompt_tuning` (learned virtual
    tokens, Lester et al. 2021), `ia3` (learned rescaling vectors, Liu et al. 2022), `bitfit` (biases and
    norms only, Ben Zaken et al. 2022), `prune` (magnitude pruning to `sparsity`, then full fine-tuning
    that keeps the pruned weights at zero)."""
    r: int = Field(8, ge=1, le=4096)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. [q_proj, v_proj], or [all-linear] for LoRA); default: peft's choice for
    the architecture (q_proj, v_proj for Llama LoRA, q, v for T5's; k_proj, v_proj, down_proj for IA3)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(r) (Kalajdzievski 2023)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: train magnitude and direction separately (Liu et al. 2024)."""
    feedforward_modules: list[str] | None = None
    """IA3: which of target_modules are feed-forward layers (scaled on their input); default: those named
    like down_proj, fc2, c_proj, w2, wo."""
    num_virtual_tokens: int = Field(8, ge=1, le=512)
    """Prompt tuning: learned tokens prepended to every input."""
    init_text: str | None = None
    """Prompt tuning: initialize the virtual tokens from the embeddings of this text (default: random)."""
    sparsity: float = Field(0.5, gt=0, lt=1)
    """Prune: fraction of the decoder's linear weights set to zero (global magnitude pruning)."""

    @model_validator(mode="before")
    @classmethod
    def _quantize_base_where_known(cls, data):
        if isinstance(data, dict) and "quantize_base" in data and "quantize_base" not in cls.model_fields:
            raise ValueError("quantize_base (QLoRA's 4-bit base) is a finetune setting; this kind trains on a "
                             "full-precision base, so remove it")
        return data

    @model_validator(mode="after")
    def _fields_match_method(self) -> "PeftSpec":
        own = METHOD_FIELDS[self.method]
        stray = sorted(f for f in self.model_fields_set - {"method"} - own)
        if stray:
            users = {f: [m for m, fs in METHOD_FIELDS.items() if f in fs] for f in stray}
            detail = "; ".join(f"{f} belongs to {' / '.join(users[f])}" for f in stray)
            raise ValueError(f"peft method '{self.method}' takes no {', '.join(stray)} ({detail})")
        if self.feedforward_modules and not self.target_modules:
            raise ValueError("feedforward_modules needs target_modules (a subset of them)")
        if self.feedforward_modules and not set(self.feedforward_modules) <= set(self.target_modules or []):
            raise ValueError(f"feedforward_modules {self.feedforward_modules} must be a subset of target_modules "
                             f"{self.target_modules}")
        return self

    @property
    def is_adapter(self) -> bool:
        """True when training produces a peft adapter (kept apart from the base weights)."""
        return self.method in ADAPTER_METHODS


class WritesTunedModel:
    """For a kind that tunes a model with its `peft: PeftSpec` and `merge: bool | None` fields (finetune, dpo):
    which of `model` and `adapter` it writes, and why not the other. (No annotations here: pydantic would
    take them for fields of the kind, ahead of its own.)"""

    def merge_problem(self) -> str:
        """The error of settings that cannot be merged, or ""."""
        if self.merge and self.peft.method == "prompt_tuning":
            return "prompt_tuning cannot be merged (virtual tokens have no weight form); set merge: false"
        return ""

    @property
    def merged(self) -> bool:
        """Whether a standalone `model` folder is written."""
        return self.peft.method != "prompt_tuning" if self.merge is None else self.merge

    def tuned_outputs(self) -> set[str]:
        """`adapter` for adapter methods, `model` when merged or trained in place, and the `tokenizer`."""
        adapter = {"adapter"} if self.peft.is_adapter else set()
        model = {"model"} if self.merged or not self.peft.is_adapter else set()
        return adapter | model | {"tokenizer"}

    def why_no(self, output: str) -> str:
        if output == "model":
            return f"peft method {self.peft.method} writes an adapter only" + (
                " (prompt tuning has no merged form)" if self.peft.method == "prompt_tuning" else "; set merge: true")
        if output == "adapter":
            return f"peft method {self.peft.method} trains the weights themselves, so there is no adapter"
        return ""


class QuantizedBasePeftSpec(PeftSpec):
    """`peft:` of a kind that can also hold its frozen base in 4 bits while LoRA trains (QLoRA)."""

    quantize_base: Literal["nf4", "fp4"] | None = None
    """LoRA: load the frozen base in 4 bits (QLoRA, Dettmers et al. 2023): bitsandbytes' `nf4` (NormalFloat) or
    `fp4`, with double quantization and bf16 compute; the adapters train in full precision. Needs a CUDA GPU and
    bitsandbytes. The merged `model` is the adapter merged into the full-precision base. Null: a float base."""
