"""`pretrain`: train a causal or masked transformer from scratch (or continue one) on a tokenize step's tokens."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, Section, TokenizerRef, TrainingStepSpec
from ..sizing import size_model

SHAPE_FIELDS = ("layers", "hidden", "heads", "intermediate")


class ModelSpec(Section):
    """Architecture of a model built from a transformers config."""

    family: Literal["llama", "gpt2", "bert", "roberta"] = "llama"
    """Architecture: `llama`, `gpt2` (causal) or `bert`, `roberta` (masked)."""
    layers: int = Field(2, ge=1, le=256)
    """Transformer blocks."""
    hidden: int = Field(64, ge=8)
    """Width of the residual stream (embedding size)."""
    heads: int = Field(4, ge=1)
    """Attention heads; must divide hidden."""
    kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (llama only; null: same as heads)."""
    intermediate: int | None = Field(None, ge=1)
    """MLP width (null: 4 x hidden)."""
    context: int = Field(128, ge=8)
    """Sequence length of the training blocks and the model's maximum positions."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention and residual streams."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection weights (fewer parameters, as in GPT-2)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        return self


class SizingSpec(Section):
    """Compute-optimal sizing (Hoffmann et al. 2022): choose the model shape and the tokens for a budget."""

    flops: float | None = Field(None, gt=0)
    """Training compute budget C in FLOPs (C = 6ND)."""
    tokens: float | None = Field(None, gt=0)
    """Tokens available D (alternative to flops): choose the N for which D is compute-optimal."""
    rule: Literal["tokens_per_param", "closed_form"] = "tokens_per_param"
    """`tokens_per_param`: D = 20 N; `closed_form`: minimise the fitted Chinchilla loss under C = 6ND."""
    tokens_per_param: float = Field(20.0, gt=0)
    """Tokens per parameter for the `tokens_per_param` rule."""
    aspect: int = Field(32, ge=4, le=512)
    """Target hidden/layers ratio when rounding N to a shape."""

    @model_validator(mode="after")
    def _one_budget(self) -> "SizingSpec":
        if (self.flops is None) == (self.tokens is None):
            raise ValueError("give exactly one of flops or tokens")
        return self


class PretrainSpec(TrainingStepSpec):
    """Pretrain a transformer with a causal (next-token) or masked (BERT) objective."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})

    kind: Literal["pretrain"]
    tokenizer: TokenizerRef
    """The tokenize step whose tokenizer and token files to train on."""
    model: ModelSpec | None = None
    """Architecture of a new model (give this or init_from)."""
    init_from: ModelRef | None = None
    """Continue pretraining this model: a step, `./path`, `/path`, `hf:ID` or `models:/name@alias`."""
    objective: Literal["causal", "masked"] = "causal"
    """`causal`: predict the next token; `masked`: 15% of non-special tokens, 80% mask / 10% random / 10% kept."""
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    """Fraction of non-special tokens selected for the masked objective."""
    sizing: SizingSpec | None = None
    """Choose layers, hidden, heads and the token budget compute-optimally (null: use model and max_steps)."""
    log_model: bool = True
    """Also log the model to the step's MLflow run (transformers flavor)."""

    @model_validator(mode="after")
    def _model_source(self) -> "PretrainSpec":
        if (self.model is None) == (self.init_from is None):
            raise ValueError("give exactly one of model (a new architecture) or init_from (an existing model)")
        if self.model is not None:
            causal = self.model.family in ("llama", "gpt2")
            if causal != (self.objective == "causal"):
                raise ValueError(f"model.family '{self.model.family}' does not fit objective '{self.objective}'; "
                                 "causal takes llama or gpt2, masked takes bert or roberta")
        if self.sizing is not None:
            if self.model is None:
                raise ValueError("sizing chooses a new model's shape; it needs model (with its family), not init_from")
            given = [f for f in SHAPE_FIELDS if f in self.model.model_fields_set]
            if given:
                raise ValueError(f"sizing chooses model.{', model.'.join(given)}; remove them or remove sizing")
            if self.max_steps is not None or self.max_tokens is not None:
                raise ValueError("sizing chooses the token budget; remove max_steps/max_tokens or remove sizing")
        return self

    def sized(self):
        """The sizing result (schemas.sizing.Shape), or None without `sizing:`."""
        if self.sizing is None:
            return None
        s = self.sizing
        return size_model(self.model.family, flops=s.flops, tokens=s.tokens, rule=s.rule,
                          tokens_per_param=s.tokens_per_param, aspect=s.aspect)

    def plan_details(self) -> dict:
        shape = self.sized()
        if shape is None:
            return {}
        return {"sizing": f"{shape.rule}: N={shape.params:,} non-embedding params (target {shape.target_params:,.0f}), "
                          f"D={shape.tokens:,} tokens, C=6ND={shape.flops:.3g} FLOPs",
                "shape": f"layers={shape.layers} hidden={shape.hidden} heads={shape.heads} "
                         f"intermediate={shape.intermediate}"}
