"""Models and tokenizers: build one from a `model:` section, load one from any source, save one that loads anywhere.

A source is what `ctx.model_source(ref)` returns for every reference form (a step's output, `./path`,
`/path`, `hf:ID`, `models:/name@alias`): a local folder or a hub id. `load_model` loads every kind of folder
a step writes: a transformers model, a peft adapter (merged into its base), optimize's bf16/fp16/int8/int4
folders (components/lib/quantize.py).
`save_pretrained` writes model and tokenizer so that every transformers version pyproject.toml admits loads them.
Importing this module registers the mlp, rnn and lstm families with transformers' Auto classes
(components/lib/sequence_models.py), so their folders load like any other, without trust_remote_code.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from components.lib import sequence_models  # noqa: F401 - registers mlp/rnn/lstm with transformers' Auto classes
from components.lib.phases import charged

SEQUENCE_FAMILIES = ("mlp", "rnn", "lstm")  # causal LMs before transformers (components/lib/sequence_models.py)
CAUSAL_FAMILIES = ("llama", "gpt2", *SEQUENCE_FAMILIES)
MASKED_FAMILIES = ("bert", "roberta")
SEQ2SEQ_FAMILIES = ("t5",)  # encoder-decoders, trained with T5's span corruption (components/lib/span_corruption.py)
# transformers 5 names the class of a tokenizers-backed tokenizer `TokenizersBackend`, which transformers 4
# does not know; `PreTrainedTokenizerFast` loads the same files in both and gives the same ids.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) for the block, the module's training mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def load_tokenizer(source: str | Path):
    """A tokenizer with a pad token (EOS stands in when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trusts_code(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def is_masked_model(source_or_config) -> bool:
    """Tell a masked LM (BERT-like encoder) from a causal one by its config."""
    from transformers import AutoConfig

    config = source_or_config if not isinstance(source_or_config, (str, Path)) else \
        AutoConfig.from_pretrained(str(source_or_config), trust_remote_code=trusts_code(source_or_config))
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs:
        return True
    if "CausalLM" in archs or "LMHead" in archs:
        return False
    return config.model_type in MASKED_FAMILIES


def is_seq2seq_model(source_or_config) -> bool:
    """Tell an encoder-decoder (T5-like: the prompt goes to the encoder, the answer comes from the decoder) by its
    config."""
    from transformers import AutoConfig

    config = source_or_config if not isinstance(source_or_config, (str, Path)) else \
        AutoConfig.from_pretrained(str(source_or_config), trust_remote_code=trusts_code(source_or_config))
    return bool(getattr(config, "is_encoder_decoder", False))


def is_adapter(source: str | Path) -> bool:
    return (Path(source) / "adapter_config.json").is_file()


@charged("startup")  # the ledger's split of the step's time (components/lib/phases.py)
def load_model(source: str | Path, objective: str = "causal", base: str | None = None, **kw: Any):
    """(model, tokenizer) from any folder a step writes, or a hub id.

    `objective`: `causal`, `masked`, `span_corruption`, or `auto` (whichever the config describes); an
    encoder-decoder folder loads as one (AutoModelForSeq2SeqLM) under `causal` too, since it generates from a
    prompt as a causal LM does. A peft adapter folder is
    merged into its base (`base`, else the one its config names); a torchao int8 folder loads through
    transformers' TorchAoConfig (its config.json), an int4 one is quantized as it loads (its quantization.json;
    components/lib/quantize.py). `kw` goes to `from_pretrained` (e.g. `dtype`).
    """
    from components.lib import quantize
    from components.lib.meter import meter

    source = str(source)
    recipe = quantize.saved_quantization(source)
    if recipe is not None or _quant_method(source) == "torchao":
        quantize.import_torchao()
    if is_adapter(source):
        from peft import PeftModel

        base = base or json.loads((Path(source) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, _ = load_model(base, objective, **kw)
        merged = PeftModel.from_pretrained(model, source).merge_and_unload()
        return merged, load_tokenizer(source if (Path(source) / "tokenizer_config.json").is_file() else base)
    check_trusted(source)  # before any read of the config, which may name code of its own
    masked = is_masked_model(source) if objective == "auto" else objective == "masked"
    seq2seq = objective == "span_corruption" or (not masked and is_seq2seq_model(source))
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForMaskedLM if masked else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(source, use_safetensors=True, trust_remote_code=trusts_code(source), **kw)
    except OSError:
        if Path(source).is_dir() and not any(Path(source).glob("*.safetensors")):
            raise ValueError(f"{source}: no .safetensors weights; llmcycle loads weights only from safetensors "
                             "(a pickled pytorch_model.bin can run code when loaded): convert it with "
                             "`save_pretrained(..., safe_serialization=True)`") from None
        raise
    return meter(quantize.apply_saved(model, recipe) if recipe else model), load_tokenizer(source)


def _quant_method(source: str | Path) -> str | None:
    """The `quant_method` of a local folder's `quantization_config` (torchao, bitsandbytes, ...), else None."""
    config = Path(source) / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    return (data.get("quantization_config") or {}).get("quant_method")


TRUSTED_ENV = "LLMCYCLE_TRUST_REMOTE_CODE"  # JSON list of the sources the spec's `trust_remote_code:` names


def trusts_code(source: str | Path) -> bool:
    """Whether the spec allows `source` to run the code it ships. The engine puts the sources the spec's
    top-level `trust_remote_code:` list resolves to in LLMCYCLE_TRUST_REMOTE_CODE for the step's process
    (loaders are called from many places, none of which should carry the list)."""
    trusted = json.loads(os.environ.get(TRUSTED_ENV, "[]"))
    return _canonical(source) in {_canonical(t) for t in trusted}


def _canonical(source: str | Path) -> str:
    return str(Path(source).resolve()) if Path(source).exists() else str(source)


def check_trusted(source: str | Path) -> None:
    """Refuse a local model that ships its own Python code (`auto_map` in config.json) unless the spec trusts
    it: transformers' trust_remote_code is on only for the sources the spec lists. A hub model that needs its
    code is refused by transformers itself (its error names the option)."""
    config = Path(source) / "config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text()) and not trusts_code(source):
        raise ValueError(f"{source}: this model ships its own Python code (auto_map in config.json) and llmcycle "
                         "does not run a model's code unless told to: list the model's reference (as the step "
                         "writes it) under `trust_remote_code:` at the top of the spec if you trust it, or use "
                         "a model whose architecture transformers has built in")


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Save a tokenizer that transformers 4 and 5 both load."""
    tokenizer.save_pretrained(str(folder))
    config = Path(folder) / "tokenizer_config.json"
    data = json.loads(config.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    if isinstance(data.get("extra_special_tokens"), list):  # T5's sentinels: 5 writes a list, 4 reads this name
        data["additional_special_tokens"] = data.pop("extra_special_tokens")
    config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@charged("logging")  # the ledger's split of the step's time (components/lib/phases.py)
def save_pretrained(model, tokenizer, folder: str | Path) -> Path:
    """A standalone transformers folder: the weights (safetensors) and a tokenizer every version loads."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder


def build_config(model_spec, tokenizer):
    """A transformers config for `model_spec` (family, layers, hidden, heads, intermediate, context, dropout; the
    mlp's window and direct connections)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    m = model_spec
    inter = m.intermediate or 4 * m.hidden
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    common = {"vocab_size": len(tokenizer), "tie_word_embeddings": m.tie_embeddings, **ids}
    if m.family in SEQUENCE_FAMILIES:
        extra = {"window": m.window, "direct_connections": m.direct_connections} if m.family == "mlp" else {}
        return sequence_models.build_config(m.family, hidden_size=m.hidden, num_hidden_layers=m.layers,
                                            dropout=m.dropout, max_position_embeddings=m.context, **extra, **common)
    if m.family == "llama":
        return LlamaConfig(hidden_size=m.hidden, intermediate_size=inter, num_hidden_layers=m.layers,
                           num_attention_heads=m.heads, num_key_value_heads=m.kv_heads or m.heads,
                           max_position_embeddings=m.context, attention_dropout=m.dropout, **common)
    if m.family == "t5":  # Raffel et al. 2020's: ReLU feed-forward, relative position buckets; `layers` each side
        return T5Config(d_model=m.hidden, d_kv=m.hidden // m.heads, d_ff=inter, num_layers=m.layers,
                        num_decoder_layers=m.layers, num_heads=m.heads, dropout_rate=m.dropout,
                        feed_forward_proj="relu", n_positions=m.context,
                        decoder_start_token_id=tokenizer.pad_token_id, **common)
    if m.family == "gpt2":
        return GPT2Config(n_embd=m.hidden, n_inner=inter, n_layer=m.layers, n_head=m.heads, n_positions=m.context,
                          resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, **common)
    cls = BertConfig if m.family == "bert" else RobertaConfig
    # RoBERTa offsets positions by pad_token_id + 1, so it needs that many extra position slots.
    positions = m.context + (tokenizer.pad_token_id or 0) + 2 if m.family == "roberta" else m.context
    return cls(hidden_size=m.hidden, intermediate_size=inter, num_hidden_layers=m.layers, num_attention_heads=m.heads,
               max_position_embeddings=positions, hidden_dropout_prob=m.dropout,
               attention_probs_dropout_prob=m.dropout, type_vocab_size=1, **common)


@charged("startup")  # the ledger's split of the step's time (components/lib/phases.py)
def build_model(model_spec, tokenizer, objective: str):
    """A freshly initialised causal LM, masked LM or encoder-decoder from the spec's `model:` section."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from components.lib.meter import meter

    want = {"causal": CAUSAL_FAMILIES, "masked": MASKED_FAMILIES, "span_corruption": SEQ2SEQ_FAMILIES}[objective]
    if model_spec.family not in want:
        raise ValueError(f"model.family '{model_spec.family}' cannot train the {objective} objective; "
                         f"expected one of {', '.join(want)}")
    config = build_config(model_spec, tokenizer)
    auto = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM,
            "span_corruption": AutoModelForSeq2SeqLM}[objective]
    return meter(auto.from_config(config))


def context_length(model, default: int = 128) -> int:
    """The longest sequence the model's positions allow (RoBERTa's offset removed)."""
    config = model.config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or default
    if config.model_type == "roberta":
        n -= (config.pad_token_id or 0) + 2
    return int(n)
