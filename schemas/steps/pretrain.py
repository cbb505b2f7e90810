"""`pretrain`: train a causal or masked LM or an encoder-decoder from scratch (or continue one) on a tokenize step's
tokens: a transformer, or a sequence model from before them (mlp, rnn, lstm)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import ModelRef, Ref, Section, TokenizerRef, TrainingStepSpec
from ..sizing import CHINCHILLA, Law, size_model

SHAPE_FIELDS = ("layers", "hidden", "heads", "intermediate")
SEQUENCE_FAMILIES = ("mlp", "rnn", "lstm")  # before transformers: no attention, causal only
CAUSAL_FAMILIES = ("llama", "gpt2", *SEQUENCE_FAMILIES)
MASKED_FAMILIES = ("bert", "roberta")
SEQ2SEQ_FAMILIES = ("t5",)
OBJECTIVE_FAMILIES = {"causal": CAUSAL_FAMILIES, "masked": MASKED_FAMILIES, "span_corruption": SEQ2SEQ_FAMILIES}
SPAN_ONLY = ("noise_density", "mean_noise_span_length")
TRANSFORMER_ONLY = ("heads", "kv_heads", "intermediate")
MLP_ONLY = ("window", "direct_connections")


class ModelSpec(Section):
    """Architecture of a model built from a transformers config (mlp, rnn, lstm: llmcycle's own config classes)."""

    family: Literal["llama", "gpt2", "bert", "roberta", "t5", "mlp", "rnn", "lstm"] = "llama"
    """Architecture: `llama`, `gpt2` (causal transformers: decoder-only), `bert`, `roberta` (masked transformers:
    encoder-only), `t5` (encoder-decoder, Raffel et al. 2020), or a causal model from before transformers: `mlp`
    (fixed-window neural LM, Bengio et al. 2003), `rnn` (Elman 1990), `lstm` (Hochreiter & Schmidhuber 1997)."""
    layers: int = Field(2, ge=1, le=256)
    """Transformer blocks (t5: in the encoder, and as many in the decoder); mlp: tanh hidden layers; rnn, lstm:
    stacked recurrent layers."""
    hidden: int = Field(64, ge=8)
    """Width of the residual stream (embedding size); mlp, rnn, lstm: the embedding size and the width of every
    hidden layer or recurrent state."""
    heads: int = Field(4, ge=1)
    """Attention heads; must divide hidden (transformers only)."""
    kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (llama only; null: same as heads)."""
    intermediate: int | None = Field(None, ge=1)
    """MLP width (null: 4 x hidden; transformers only)."""
    context: int = Field(128, ge=8)
    """Sequence length of the training blocks and the model's maximum positions (mlp, rnn, lstm have no position
    limit: it is their training and scoring length; t5: the length of the corrupted encoder input)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on attention and residual streams; mlp, rnn, lstm: on the embeddings, between layers and before
    the output."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection weights (fewer parameters, as in GPT-2)."""
    window: int = Field(4, ge=1, le=512)
    """mlp only: tokens each prediction reads, the current one included (Bengio et al.'s n - 1; n = 5 there)."""
    direct_connections: bool = False
    """mlp only: also map the window's concatenated embeddings straight to the logits (Bengio et al.'s W;
    window x hidden x vocabulary more parameters)."""

    @model_validator(mode="after")
    def _fields_fit_family(self) -> "ModelSpec":
        def stray(fields: tuple[str, ...]) -> tuple[str, str]:
            given = [f for f in fields if f in self.model_fields_set]
            return "model." + ", model.".join(given) if given else "", "it" if len(given) == 1 else "them"

        names, them = stray(TRANSFORMER_ONLY)
        if names and self.family in SEQUENCE_FAMILIES:
            raise ValueError(f"{names}: transformers only, and family '{self.family}' has no attention blocks; "
                             f"remove {them}")
        names, them = stray(MLP_ONLY)
        if names and self.family != "mlp":
            raise ValueError(f"{names}: family mlp only, not '{self.family}'; remove {them} or set family: mlp")
        if self.family in SEQUENCE_FAMILIES:
            return self
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
    constants: Annotated[str, Ref("constants")] | None = None
    """closed_form: a `scaling` step whose fitted E, A, B, alpha, beta to minimise (this step then runs after it;
    `llmcycle plan` shows the published constants' choice until the fit exists). Null: Hoffmann et al.'s published
    constants."""

    @model_validator(mode="after")
    def _one_budget(self) -> "SizingSpec":
        if (self.flops is None) == (self.tokens is None):
            raise ValueError("give exactly one of flops or tokens")
        if self.constants is not None and self.rule != "closed_form":
            raise ValueError(f"sizing.constants ('{self.constants}') gives the closed form's constants; it needs "
                             f"rule: closed_form, got rule: {self.rule}")
        return self


class PretrainSpec(TrainingStepSpec):
    """Pretrain a language model with a causal (next-token), masked (BERT) or span-corruption (T5) objective."""

    produces: ClassVar[frozenset[str]] = frozenset({"model", "tokenizer"})

    kind: Literal["pretrain"]
    tokenizer: TokenizerRef
    """The tokenize step whose tokenizer and token files to train on."""
    model: ModelSpec | None = None
    """Architecture of a new model (give this or init_from)."""
    init_from: ModelRef | None = None
    """Continue pretraining this model: a step, `./path`, `/path`, `hf:ID` or `models:/name@alias`."""
    objective: Literal["causal", "masked", "span_corruption"] = "causal"
    """`causal`: predict the next token; `masked`: 15% of non-special tokens, 80% mask / 10% random / 10% kept;
    `span_corruption` (t5): random spans dropped, one sentinel in place of each, the decoder writes the spans."""
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    """Fraction of non-special tokens selected for the masked objective."""
    noise_density: float = Field(0.15, gt=0, le=0.5)
    """span_corruption: fraction of each block's tokens dropped (T5's 0.15)."""
    mean_noise_span_length: float = Field(3.0, ge=1)
    """span_corruption: mean length of a dropped span (T5's 3); spans = round(dropped tokens / this)."""
    sizing: SizingSpec | None = None
    """Choose layers, hidden, heads and the token budget compute-optimally (null: use model and max_steps)."""
    log_model: bool = True
    """Also log the model to the step's MLflow run (transformers flavor)."""

    @model_validator(mode="after")
    def _model_source(self) -> "PretrainSpec":
        if (self.model is None) == (self.init_from is None):
            raise ValueError("give exactly one of model (a new architecture) or init_from (an existing model)")
        if self.model is not None and self.model.family not in OBJECTIVE_FAMILIES[self.objective]:
            raise ValueError(f"model.family '{self.model.family}' does not fit objective '{self.objective}'; "
                             "causal takes llama, gpt2, mlp, rnn or lstm, masked takes bert or roberta, "
                             "span_corruption takes t5")
        given = [f for f in SPAN_ONLY if f in self.model_fields_set]
        if given and self.objective != "span_corruption":
            raise ValueError(f"{', '.join(given)}: objective span_corruption only, not '{self.objective}'; remove "
                             f"{'it' if len(given) == 1 else 'them'}")
        if self.sizing is not None:
            if self.model is None:
                raise ValueError("sizing chooses a new model's shape; it needs model (with its family), not init_from")
            if self.model.family in SEQUENCE_FAMILIES:
                raise ValueError(f"sizing shapes transformers (layers, hidden, heads); model.family "
                                 f"'{self.model.family}' is not one: give model.layers and model.hidden, or remove "
                                 "sizing")
            if self.model.family in SEQ2SEQ_FAMILIES:
                raise ValueError(f"sizing counts the parameters of one stack of blocks, and model.family "
                                 f"'{self.model.family}' has an encoder and a decoder (with cross-attention): give "
                                 "model.layers and model.hidden, or remove sizing")
            given = [f for f in SHAPE_FIELDS if f in self.model.model_fields_set]
            if given:
                raise ValueError(f"sizing chooses model.{', model.'.join(given)}; remove them or remove sizing")
            if self.max_steps is not None or self.max_tokens is not None:
                raise ValueError("sizing chooses the token budget; remove max_steps/max_tokens or remove sizing")
        return self

    def sized(self, law: Law = CHINCHILLA):
        """The sizing result (schemas.sizing.Shape), or None without `sizing:`; `law`: the closed form's constants
        (the fitted ones of `sizing.constants` once that step has run)."""
        if self.sizing is None:
            return None
        s = self.sizing
        return size_model(self.model.family, flops=s.flops, tokens=s.tokens, rule=s.rule,
                          tokens_per_param=s.tokens_per_param, aspect=s.aspect, law=law)

    def plan_details(self) -> dict:
        shape = self.sized()
        if shape is None:
            return {}
        details = {"sizing": f"{shape.rule}: N={shape.params:,} non-embedding params (target "
                             f"{shape.target_params:,.0f}), D={shape.tokens:,} tokens, C=6ND={shape.flops:.3g} FLOPs",
                   "shape": f"layers={shape.layers} hidden={shape.hidden} heads={shape.heads} "
                            f"intermediate={shape.intermediate}"}
        if self.sizing.constants:  # plan reads no run outputs: the fitted constants exist only once the step ran
            details["constants"] = (f"fitted by step '{self.sizing.constants}' when this step runs; shown above with "
                                    "the published ones (Hoffmann et al. 2022)")
        return details
