"""The sequence models before transformers, as transformers causal LMs: a fixed-window MLP, an Elman RNN, an LSTM.

- `mlp`: Bengio et al. 2003, "A Neural Probabilistic Language Model": the embeddings of the last `window` tokens,
  concatenated, go through tanh layers; with `direct_connections` the concatenation also reaches the logits
  through a linear map (the paper's W). Positions before the input and pad positions read a zero embedding.
- `rnn`: Elman 1990, "Finding Structure in Time": h_t = tanh(W x_t + U h_{t-1} + b), `torch.nn.RNN` layers.
- `lstm`: Hochreiter & Schmidhuber 1997 (with the forget gate of Gers et al. 2000, as `torch.nn.LSTM` has it).

Every family embeds tokens in `hidden_size` dimensions, and with `tie_word_embeddings` decodes the last layer by
its dot product with every token embedding (Press & Wolf 2017), as llmcycle's transformers do (else an `lm_head`).
Initialization: token embeddings N(0, `embedding_init_std` = 0.3), the layers PyTorch's defaults.
Each has its own `PretrainedConfig` (model types `llmcycle_mlp_lm`, `llmcycle_rnn_lm`, `llmcycle_lstm_lm`) and a
`PreTrainedModel` + `GenerationMixin` class, registered with `AutoConfig` and `AutoModelForCausalLM` when this
module is imported (components/lib/models.py imports it): their folders are plain safetensors + config.json,
loaded by `AutoModelForCausalLM.from_pretrained` with no `trust_remote_code`.

Conventions shared with transformers' causal LMs: `logits[:, t]` predicts token t + 1 from tokens 0..t; `labels`
are the input ids, shifted inside the model, -100 ignored. Padding: a position whose `attention_mask` is 0 leaves
the recurrent state as it was (its tokens are skipped: packed sequences), and is a zero embedding in the MLP's
window, so a left-padded row gives the same logits at its real positions as the same row unpadded. The output at
a pad position is that of a zero state and means nothing. `cache` (transformers 5; `past_key_values` before) holds
the recurrent state after the tokens seen so far, so generation feeds one new token per step; the MLP needs none
(generation feeds it the last `window` tokens).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE = -100
# transformers 5 renamed the output's `past_key_values` to `cache`; generation reads whichever the version has.
STATE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class SequenceLMConfig(PretrainedConfig):
    """What the three families share: vocabulary, width, depth, dropout, tying, the training length."""

    def __init__(self, vocab_size: int = 2048, hidden_size: int = 64, num_hidden_layers: int = 1,
                 dropout: float = 0.0, max_position_embeddings: int = 128, embedding_init_std: float = 0.3,
                 tie_word_embeddings: bool = True, use_cache: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.dropout = dropout
        # No position limit: the length of the training blocks, which scoring and evaluation use as their window.
        self.max_position_embeddings = max_position_embeddings
        # GPT-2's 0.02 suits a transformer, whose final norm scales its state up to sqrt(hidden) before decoding.
        # These states are tanh-bounded: with 0.02 the RNN and LSTM of specs/course/sequences.yaml stayed at the
        # unigram loss (6.35 nats) for 300 steps; 0.3 learns from the start (0.1 learned slower, 1.0 ended worse).
        self.embedding_init_std = embedding_init_std
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings


class MlpLMConfig(SequenceLMConfig):
    """Bengio et al. 2003's fixed-window neural LM."""

    model_type = "llmcycle_mlp_lm"

    def __init__(self, window: int = 4, direct_connections: bool = False, **kwargs):
        self.window = window
        self.direct_connections = direct_connections
        super().__init__(**kwargs)


class RnnLMConfig(SequenceLMConfig):
    """An Elman (tanh) recurrent LM."""

    model_type = "llmcycle_rnn_lm"

    def __init__(self, **kwargs):  # its own __init__: transformers 5 replaces a config's missing one
        super().__init__(**kwargs)


class LstmLMConfig(SequenceLMConfig):
    """An LSTM LM."""

    model_type = "llmcycle_lstm_lm"

    def __init__(self, **kwargs):  # its own __init__: transformers 5 replaces a config's missing one
        super().__init__(**kwargs)


class RecurrentState:
    """The state after `seen` columns of input: per layer h (rnn) or (h, c) (lstm), each (1, batch, hidden)."""

    def __init__(self, layers: list, seen: int):
        self.layers, self.seen = layers, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "RecurrentState":
        """Keep the rows of the beams chosen (beam search)."""
        self.layers = [_map_state(s, lambda t: t.index_select(1, beam_idx.to(t.device))) for s in self.layers]
        return self


def _map_state(state, fn):
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1], -100 ignored (transformers' ForCausalLMLoss)."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=IGNORE)
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") / num_items_in_batch


class SequenceLMPreTrainedModel(PreTrainedModel):
    """Embedding in, tied (or separate) decoding out, transformers' loss and output conventions (each family's
    class inherits GenerationMixin itself: transformers looks for it among a class's direct bases)."""

    config_class = SequenceLMConfig
    base_model_prefix = "sequence_lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    def _build_ends(self, config: SequenceLMConfig) -> None:
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head  # None when tied: the logits are computed from embed_tokens.weight

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits: similarity to every token embedding (tied), or a separate output layer."""
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)

    def _init_weights(self, module: nn.Module) -> None:
        """Token embeddings N(0, embedding_init_std); the layers PyTorch's own defaults: uniform in
        +-1/sqrt(fan_in) (Linear), +-1/sqrt(hidden) (RNN, LSTM)."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
        elif isinstance(module, (nn.Linear, nn.RNNBase)):
            module.reset_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no key/value cache: the recurrent state is the cache, built by the model itself

    def embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def output(self, logits, labels, hidden_states, state, return_dict, num_items_in_batch=None):
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{STATE_FIELD: state})
        return out if return_dict is not False else out.to_tuple()


class MlpLMForCausalLM(SequenceLMPreTrainedModel, GenerationMixin):
    """Bengio et al. 2003: y = tanh-layers(concat(e_{t-n+1} .. e_t)) . E^T  [+ W concat(...)]."""

    config_class = MlpLMConfig

    def __init__(self, config: MlpLMConfig):
        super().__init__(config)
        self._build_ends(config)
        width = config.window * config.hidden_size
        self.layers = nn.ModuleList(nn.Linear(width if i == 0 else config.hidden_size, config.hidden_size)
                                    for i in range(config.num_hidden_layers))
        self.direct = nn.Linear(width, config.vocab_size, bias=False) if config.direct_connections else None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                output_hidden_states=None, return_dict=None, num_items_in_batch=None, **kwargs):
        x = self.embed(input_ids, inputs_embeds)
        if attention_mask is not None:
            x = x * attention_mask[:, -x.shape[1]:, None].to(x.dtype)  # a pad position is a zero embedding
        x = self.drop(x)
        batch, length, width = x.shape
        n = self.config.window
        # windows[:, t] = [e_{t-n+1}, ..., e_t], zeros before the first position
        windows = F.pad(x, (0, 0, n - 1, 0)).unfold(1, n, 1).transpose(2, 3).reshape(batch, length, n * width)
        h, hidden = windows, [x]
        for layer in self.layers:
            h = self.drop(torch.tanh(layer(h)))
            hidden.append(h)
        logits = self.decode(h)
        if self.direct is not None:
            logits = logits + self.direct(windows)
        return self.output(logits, labels, tuple(hidden) if output_hidden_states else None, None, return_dict,
                           num_items_in_batch)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """The last `window` tokens are all the next prediction reads."""
        n = self.config.window
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            return {"inputs_embeds": inputs_embeds[:, -n:], "attention_mask": _tail(attention_mask, n)}
        return {"input_ids": input_ids[:, -n:], "attention_mask": _tail(attention_mask, n)}


def _tail(mask, n):
    return None if mask is None else mask[:, -n:]


class RecurrentLMForCausalLM(SequenceLMPreTrainedModel):
    """Stacked recurrent layers (`cell`: torch.nn.RNN or torch.nn.LSTM) between the embedding and the decoding."""

    cell: type[nn.RNNBase] = nn.RNN
    _is_stateful = True

    def __init__(self, config: SequenceLMConfig):
        super().__init__(config)
        self._build_ends(config)
        h = config.hidden_size
        self.layers = nn.ModuleList(self.cell(h, h, batch_first=True) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, use_cache=None,
                output_hidden_states=None, return_dict=None, num_items_in_batch=None, **kwargs):
        state = kwargs.get("cache", kwargs.get("past_key_values"))
        state = state if isinstance(state, RecurrentState) else None  # an empty transformers Cache: start afresh
        x = self.drop(self.embed(input_ids, inputs_embeds))
        mask = None if attention_mask is None else attention_mask[:, -x.shape[1]:]
        out, layers = self.recur(x, mask, state.layers if state is not None else [None] * len(self.layers))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        new = RecurrentState(layers, (state.seen if state else 0) + x.shape[1]) if use_cache else None
        logits = self.decode(self.drop(out))
        return self.output(logits, labels, (x, out) if output_hidden_states else None, new, return_dict,
                           num_items_in_batch)

    def recur(self, x: torch.Tensor, mask: torch.Tensor | None, states: list) -> tuple[torch.Tensor, list]:
        """Run the layers over x (batch, length, hidden) from `states`; masked positions leave the state as is."""
        if mask is None or bool(mask.all()):
            new = []
            for i, (layer, s) in enumerate(zip(self.layers, states)):
                x, s = layer(x if i == 0 else self.drop(x), s)
                new.append(s)
            return x, new
        # Valid positions first, in order: each row becomes right-padded and is packed to its own length.
        lengths = mask.sum(1)
        order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
        index = order[..., None].expand_as(x)
        packed = pack_padded_sequence(x.gather(1, index), lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        new = []
        for i, (layer, s) in enumerate(zip(self.layers, states)):
            if i:
                packed = PackedSequence(self.drop(packed.data), packed.batch_sizes, packed.sorted_indices,
                                        packed.unsorted_indices)
            packed, s = layer(packed, s)
            new.append(s)
        compact, _ = pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])
        out = torch.zeros_like(compact).scatter(1, index, compact)
        empty = lengths == 0  # nothing to read: the state stays, the outputs are those of a zero state
        if bool(empty.any()):
            out[empty] = 0
            new = [_keep_rows(n, s, empty) for n, s in zip(new, states)]
        return out, new

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, use_cache=None,
                                      **kwargs):
        """Only the columns the state has not read yet (all of them on the first call)."""
        state = kwargs.get("cache", kwargs.get("past_key_values"))
        state = state if isinstance(state, RecurrentState) else None
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, STATE_FIELD: state}
        if state is None and inputs_embeds is not None and input_ids.shape[1] == 0:
            return {**inputs, "inputs_embeds": inputs_embeds}
        return {**inputs, "input_ids": input_ids[:, state.seen:] if state is not None else input_ids}

    def _reorder_cache(self, state, beam_idx):
        return state.reorder_cache(beam_idx) if isinstance(state, RecurrentState) else state


def _keep_rows(new, old, rows: torch.Tensor):
    """`new` with the rows in `rows` put back to `old` (zeros where there was no state)."""
    if isinstance(new, tuple):
        return tuple(_keep_rows(n, None if old is None else o, rows) for n, o in zip(new, old or (None,) * len(new)))
    new = new.clone()
    new[:, rows] = 0 if old is None else old[:, rows]
    return new


class RnnLMForCausalLM(RecurrentLMForCausalLM, GenerationMixin):
    """Elman 1990: tanh recurrent layers."""

    config_class = RnnLMConfig
    cell = nn.RNN


class LstmLMForCausalLM(RecurrentLMForCausalLM, GenerationMixin):
    """Hochreiter & Schmidhuber 1997: LSTM layers."""

    config_class = LstmLMConfig
    cell = nn.LSTM


FAMILIES = {"mlp": (MlpLMConfig, MlpLMForCausalLM), "rnn": (RnnLMConfig, RnnLMForCausalLM),
            "lstm": (LstmLMConfig, LstmLMForCausalLM)}


def build_config(family: str, **kwargs) -> SequenceLMConfig:
    """The config of family `mlp`, `rnn` or `lstm`."""
    return FAMILIES[family][0](**kwargs)


def peft_problem(model, method: str, target_modules: list[str] | None) -> str | None:
    """Why `peft.method` cannot train this family (None: it can, or the model is not one of these families).

    peft adapts Linear, Embedding and Conv layers, not torch.nn.RNN or torch.nn.LSTM (nor does magnitude pruning,
    components/lib/peft.py); its prompt tuning needs attention heads; and it knows no default target_modules for
    model types it was not told about."""
    family = next((f for f, (config, _) in FAMILIES.items()
                   if getattr(getattr(model, "config", None), "model_type", None) == config.model_type), None)
    if family is None or method in ("full", "bitfit") or (family == "mlp" and method == "prune"):
        return None
    layer = f"torch.nn.{'LSTM' if family == 'lstm' else 'RNN'}"
    if method == "prompt_tuning":
        return (f"peft.method 'prompt_tuning' cannot train family {family}: peft's prompt tuning reads the attention "
                "heads from the model's config, and this family has no attention; use peft.method full"
                + (" or lora" if family == "mlp" else ""))
    if family != "mlp" and method == "prune":
        return (f"peft.method 'prune' cannot train family {family}: magnitude pruning prunes Linear layers, and "
                f"{layer} is not one; use peft.method full (every weight) or bitfit (the recurrent biases)")
    if family != "mlp":
        return (f"peft.method '{method}' cannot train family {family}: peft adapts Linear layers, not {layer}, and "
                "the family has no other layers to adapt; use peft.method full (every weight) or bitfit (the "
                "recurrent biases)")
    if method in ("lora", "ia3") and not target_modules:
        return (f"peft.method '{method}' on family mlp needs peft.target_modules (peft has no default for it): "
                "e.g. [all-linear], or [layers.0, layers.1]")
    return None


def register() -> None:
    """Make AutoConfig and AutoModelForCausalLM know the three model types (idempotent). The classes are also
    named in the `transformers` module, where MLflow's transformers flavor looks a logged model's class up."""
    import sys

    import transformers.processing_utils  # noqa: F401 - its first import replaces sys.modules["transformers"]

    transformers = sys.modules["transformers"]
    for config, model in FAMILIES.values():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
        for cls in (config, model):
            if getattr(transformers, cls.__name__, cls) is cls:
                setattr(transformers, cls.__name__, cls)


register()
