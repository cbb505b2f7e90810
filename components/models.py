"""Build transformers models from a `model:` section, and load models and tokenizers from a source.

A source is whatever `ctx.model_source(ref)` returns: a local folder or a hub id. Models are built with
transformers configs and `from_config`, so every saved result is a standard model folder.
"""

from __future__ import annotations

from typing import Any

CAUSAL_FAMILIES = ("llama", "gpt2")
MASKED_FAMILIES = ("bert", "roberta")


def load_tokenizer(source: str):
    """A tokenizer with a pad token (EOS stands in when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: str, **kw: Any):
    """AutoModelForCausalLM.from_pretrained with a clear error for folders that hold no model."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, **kw)


def load_masked_lm(source: str, **kw: Any):
    """AutoModelForMaskedLM.from_pretrained."""
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(source, **kw)


def is_masked_model(source_or_config) -> bool:
    """Tell a masked LM (BERT-like encoder) from a causal one by its config."""
    from transformers import AutoConfig

    config = source_or_config if not isinstance(source_or_config, str) else AutoConfig.from_pretrained(source_or_config)
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs:
        return True
    if "CausalLM" in archs or "LMHead" in archs:
        return False
    return config.model_type in MASKED_FAMILIES


def load_lm(source: str, **kw: Any):
    """Load a causal or masked LM, whichever the folder's config describes; return (model, is_masked)."""
    masked = is_masked_model(source)
    return (load_masked_lm if masked else load_causal_lm)(source, **kw), masked


def build_config(model_spec, tokenizer):
    """A transformers config for `model_spec` (family, layers, hidden, heads, intermediate, context, dropout)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    m = model_spec
    inter = m.intermediate or 4 * m.hidden
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    common = {"vocab_size": len(tokenizer), "tie_word_embeddings": m.tie_embeddings, **ids}
    if m.family == "llama":
        return LlamaConfig(hidden_size=m.hidden, intermediate_size=inter, num_hidden_layers=m.layers,
                           num_attention_heads=m.heads, num_key_value_heads=m.kv_heads or m.heads,
                           max_position_embeddings=m.context, attention_dropout=m.dropout, **common)
    if m.family == "gpt2":
        return GPT2Config(n_embd=m.hidden, n_inner=inter, n_layer=m.layers, n_head=m.heads, n_positions=m.context,
                          resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, **common)
    cls = BertConfig if m.family == "bert" else RobertaConfig
    # RoBERTa offsets positions by pad_token_id + 1, so it needs that many extra position slots.
    positions = m.context + (tokenizer.pad_token_id or 0) + 2 if m.family == "roberta" else m.context
    return cls(hidden_size=m.hidden, intermediate_size=inter, num_hidden_layers=m.layers, num_attention_heads=m.heads,
               max_position_embeddings=positions, hidden_dropout_prob=m.dropout,
               attention_probs_dropout_prob=m.dropout, type_vocab_size=1, **common)


def build_model(model_spec, tokenizer, objective: str):
    """A freshly initialised causal or masked LM from the spec's `model:` section."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    want = CAUSAL_FAMILIES if objective == "causal" else MASKED_FAMILIES
    if model_spec.family not in want:
        raise ValueError(f"model.family '{model_spec.family}' cannot train the {objective} objective; "
                         f"expected one of {', '.join(want)}")
    config = build_config(model_spec, tokenizer)
    auto = AutoModelForCausalLM if objective == "causal" else AutoModelForMaskedLM
    return auto.from_config(config)


def context_length(model, default: int = 128) -> int:
    """The longest sequence the model's positions allow (RoBERTa's offset removed)."""
    config = model.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or default
    if config.model_type == "roberta":
        n -= (config.pad_token_id or 0) + 2
    return int(n)
