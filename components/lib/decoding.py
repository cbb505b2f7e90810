"""How llmcycle decodes: `Decoder.generate`, the one entry point of every step that generates (evaluate's
samples, tasks and references; ppo, grpo and collect rollouts), with `trainer.generation`'s cache and compile.

Two paths, the same tokens:
- **llmcycle's loop** (`decode`) for greedy decoding and plain sampling at a temperature (evaluate's greedy
  answers, every RL rollout) on a decoder-only transformers model with a transformers KV cache, on a CPU. It
  computes what `GenerationMixin._sample` computes for these settings: position ids from the attention mask,
  a prefill of the prompt, then per token the float32 logits of the last position, EOS masked until
  `min_new_tokens` (`MinNewTokensLengthLogitsProcessor`), the division by the temperature, softmax and one
  `torch.multinomial` draw for the batch (or the argmax), pad for rows that stopped, and an end when every
  row has stopped. So greedy outputs are identical to `generate`'s, and sampled ones are too under the same
  seed (tests/components/test_decoding.py). Hand-written, not `generate`, because on a small model on a CPU
  generate's per-token bookkeeping is a large part of the time: its logits-processor and stopping-criteria
  lists, `prepare_inputs_for_generation`'s clones and the attention mask rebuilt for every token. The loop
  keeps one boolean `[batch, 1, 1, width]` mask, updated in place, that SDPA reads as it is; measured
  side by side in benchmarks/bench_generate.py.
- **transformers' `generate`** for everything else: beam search, top-k/top-p and other logits processors,
  models that keep their own state (llmcycle's mlp/rnn/lstm), encoder-decoders, prompt-learning adapters,
  sliding-window or flash attention; and on CUDA, where transformers' own static cache with its compiled
  decoding (CUDA graphs) is the fast path.

The loop's prefill also skips work `generate` does: a prompt repeated in the batch (grpo's G completions, collect's
k) is run once, and prompts of very different lengths run in length-sorted groups cut to their own longest
prompt, their keys and values then placed where the full batch has them (`prefill`).

`compile`: torch.compile of the per-token forward, which needs a static cache and a model that compiles in one
graph (`_can_compile_fullgraph`); `auto` compiles on CUDA only: on this CPU the one-off compile (20-60 s)
costs more than a step's decoding saves (benchmarks/bench_generate.py). `cache`: `static` preallocates prompt
+ `max_new_tokens` positions (`transformers.StaticCache`: fixed shapes), `dynamic` grows by one position per
token (`DynamicCache`); `auto` is static when the decoding is compiled, else dynamic (on the CPU, uncompiled,
the two measured alike, and dynamic attends only over the positions filled so far).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch

CACHES = ("auto", "dynamic", "static")
STATIC_ROUND = 64  # a compiled loop rounds its cache width up to this, so prompts of similar length share a graph
# GenerationConfig fields whose logits processors, beam or output options the loop does not implement, with the
# value that switches them off (None also does); any other value sends the call to transformers' generate.
OFF = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
       "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
       "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None, "constraints": None,
       "min_length": 0, "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
       "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
       "sequence_bias": None, "guidance_scale": 1.0, "watermarking_config": None, "renormalize_logits": False,
       "stop_strings": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
       "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
       "return_dict_in_generate": False, "diversity_penalty": 0.0, "max_matching_ngram_size": None}
SAMPLING_OFF = {"top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                "top_h": None}
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its compiled forward
_LINE_ENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {(size, eos): ids}


@dataclass(frozen=True)
class Plan:
    """How one call decodes: `path` `loop` or `generate`, the cache, whether the forward is compiled, and why
    the loop was not taken (empty when it was)."""

    path: str
    cache: str | None
    compile: bool
    why: str = ""


@dataclass(frozen=True)
class Decoder:
    """The cache and compile choices (trainer.generation); `generate` decodes a left-padded batch with them."""

    cache: str = "auto"
    compile: bool | str = "auto"

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"generation.cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if self.compile not in ("auto", True, False):
            raise ValueError(f"generation.compile must be auto, true or false, got {self.compile!r}")

    def plan(self, model, config, device: torch.device) -> Plan:
        """The path, cache and compile this call gets (`auto` resolved for this model and device)."""
        static_ok = bool(getattr(_base(model), "_can_compile_fullgraph", False))  # one graph: a static cache
        compile = static_ok and self.cache != "dynamic" and (
            self.compile is True or (self.compile == "auto" and device.type == "cuda"))
        cache = "static" if static_ok and (self.cache == "static" or compile) else "dynamic"
        if device.type == "cuda":
            return Plan("generate", cache if cache == "static" else None, compile, "on CUDA transformers' own static "
                        "cache and compiled decoding (CUDA graphs) are the fast path")
        why = loop_problem(model, config)
        if why:
            return Plan("generate", None, False, why)
        return Plan("loop", cache, compile)

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config,
                 stop_ids: list[int] | None = None) -> torch.Tensor:
        """Prompt + new ids, as `model.generate(...)` returns them; `stop_ids` also end a row (after the token)."""
        plan = self.plan(model, config, input_ids.device)
        if plan.path == "loop":
            return decode(model, input_ids, attention_mask, config, stop_ids, plan.cache, plan.compile)
        return plain_generate(model, input_ids, attention_mask, config, stop_ids, plan)


def _base(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loop_problem(model, config) -> str:
    """Why llmcycle's loop cannot decode this call exactly as `generate` would ("" when it can)."""
    base = _base(model)
    mc = base.config
    if getattr(mc, "is_encoder_decoder", False):
        return "an encoder-decoder"
    peft = getattr(model, "peft_config", None)
    if peft and any(getattr(c, "is_prompt_learning", False) for c in peft.values()):
        return "a prompt-learning adapter (virtual tokens)"
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return "the model keeps its own state, not a transformers KV cache"
    if not {"cache", "position_ids", "logits_to_keep"} <= set(inspect.signature(base.forward).parameters):
        return "its forward takes no cache/position_ids/logits_to_keep (transformers < 5 or a custom model)"
    if getattr(mc, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {mc._attn_implementation}"
    text = mc.get_text_config(decoder=True) if hasattr(mc, "get_text_config") else mc
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False or \
            any(t != "full_attention" for t in getattr(text, "layer_types", None) or []):
        return "sliding-window or hybrid attention layers"
    try:
        config = base._prepare_generation_config(config)[0]  # the model's generation_config fills unset fields
    except Exception as err:  # noqa: BLE001 - any refusal sends the call to generate, which reports it
        return f"generate's config handling ({type(err).__name__})"
    if config.max_new_tokens is None:
        return "max_length without max_new_tokens"
    checks = dict(OFF, **(SAMPLING_OFF if config.do_sample else {}))
    for field, off in checks.items():
        value = getattr(config, field, None)
        if value is not None and value != off:
            return f"{field}={value!r} (a generate option the loop does not implement)"
    return ""


def eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def plain_generate(model, input_ids, attention_mask, config, stop_ids, plan: Plan) -> torch.Tensor:
    """transformers' `generate`, with the plan's cache and compile."""
    import copy

    from transformers import StoppingCriteriaList

    if plan.cache == "static" or plan.compile is False:
        config = copy.deepcopy(config)
        config.cache_implementation = "static" if plan.cache == "static" else config.cache_implementation
        config.disable_compile = not plan.compile
    extra = set(stop_ids or []) - set(eos_ids(config))
    stopping = StoppingCriteriaList([StopAtTokens(sorted(extra))] if extra else [])
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                          stopping_criteria=stopping)


class StopAtTokens:
    """A transformers StoppingCriteria: a row is done once its last token is one of `ids`."""

    def __init__(self, ids: list[int]):
        self.ids = torch.tensor(ids, dtype=torch.long)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


def compiled_forward(model):
    """`torch.compile` of the model's call, made once per model (weights may change between calls: they are
    graph inputs, not constants). It is given input embeddings, looked up eagerly outside the graph, so that
    hooks on the embedding (components/lib/meter.py counts tokens there) run as they do without compile."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def attention_bias(keep: torch.Tensor, model) -> torch.Tensor:
    """The 4-D mask the attention implementation reads: boolean for SDPA, additive (0 / dtype min) for eager."""
    mask = keep[:, None, None, :]
    if getattr(_base(model).config, "_attn_implementation", "sdpa") == "eager":
        dtype = _base(model).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config, stop_ids: list[int] | None = None,
           cache: str = "dynamic", compile: bool = False) -> torch.Tensor:
    """`generate`'s greedy / sampling loop for a left-padded batch (see the module docstring). `compile` (static
    cache only) compiles the per-token steps; the prefill, whose shape changes with every prompt, stays eager."""
    from transformers import DynamicCache, StaticCache

    base = _base(model)
    compiled, embed = (compiled_forward(model), model.get_input_embeddings()) if compile else (None, None)
    round_to = STATIC_ROUND if compile else 1
    batch, length = input_ids.shape
    new_tokens, min_new = config.max_new_tokens, config.min_new_tokens or 0
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids(config) or [0])[0]
    eos = eos_ids(config)
    stops = torch.tensor(sorted(set(eos) | set(stop_ids or [])), dtype=torch.long, device=input_ids.device)
    width = -(-(length + new_tokens) // round_to) * round_to
    padded = not bool(attention_mask.all())
    keep = torch.zeros(batch, width, dtype=torch.bool, device=input_ids.device)
    keep[:, :length] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    kv = StaticCache(config=base.config, max_cache_len=width) if cache == "static" else \
        DynamicCache(config=base.config)
    logits = prefill(model, input_ids, attention_mask if padded or cache == "static" else None, positions, kv,
                     dedupe=not compile)
    position = positions[:, -1:]
    alive = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    new = torch.full((batch, new_tokens), pad, dtype=torch.long, device=input_ids.device)
    for step in range(new_tokens):
        scores = logits.to(dtype=torch.float32, copy=True)
        if step < min_new and eos:
            scores[:, eos] = -float("inf")
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                scores = scores / config.temperature
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        token = torch.where(alive, token, pad)
        new[:, step] = token
        alive &= ~torch.isin(token, stops)
        if step == new_tokens - 1 or not alive.any():
            return torch.cat([input_ids, new[:, :step + 1]], dim=1)
        keep[:, length + step] = True
        position = position + 1
        mask = attention_bias(keep if cache == "static" else keep[:, :length + step + 1], model) \
            if padded or cache == "static" else None
        if compiled is None:
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=kv,
                        use_cache=True, logits_to_keep=1)
        else:
            out = compiled(inputs_embeds=embed(token[:, None]), attention_mask=mask, position_ids=position, cache=kv,
                           use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return torch.cat([input_ids, new[:, :0]], dim=1)  # max_new_tokens == 0


def prefill(model, input_ids, attention_mask, positions, kv, dedupe: bool = True) -> torch.Tensor:
    """Run the prompts into the cache `kv`; the last position's logits, one row per prompt.

    Two savings, same numbers: a prompt that appears several times in the batch (grpo's G completions per
    prompt, collect's k) is run once and its cache rows copied; and prompts of very different lengths are run
    in length-sorted groups, each cut to its own longest prompt, so that left padding is not computed, then
    their keys and values are placed at the columns the full batch has them (`prefill_groups`). A compiled
    loop (`dedupe` False) runs the batch as it is.
    """
    batch, width = input_ids.shape
    rows = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask], dim=1)
    first, inverse = torch.arange(batch, device=rows.device), None
    if dedupe:
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # sorted: `inverse` restores the order
        if len(unique) < batch:
            first = torch.zeros(len(unique), dtype=torch.long, device=rows.device).scatter_(
                0, inverse, torch.arange(batch, device=rows.device))  # a row of the batch for each distinct prompt
        else:
            inverse = None
    lengths = attention_mask[first].sum(1) if attention_mask is not None else torch.full((len(first),), width)
    groups = prefill_groups(lengths.tolist(), width) if dedupe else [list(range(len(first)))]
    if len(groups) == 1 and len(first) == batch:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=kv,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]
    from transformers import DynamicCache

    keys, values, logits = None, None, None
    for group in groups:
        rows_g = first[torch.tensor(group, device=rows.device)]
        cut = int(lengths[group].max())  # left padding beyond the group's longest prompt is dropped
        part = DynamicCache(config=_base(model).config)
        out = model(input_ids=input_ids[rows_g, -cut:], position_ids=positions[rows_g, -cut:], cache=part,
                    attention_mask=None if attention_mask is None else attention_mask[rows_g, -cut:],
                    use_cache=True, logits_to_keep=1)
        if keys is None:
            keys = [layer.keys.new_zeros((len(first), *layer.keys.shape[1:2], width, layer.keys.shape[3]))
                    for layer in part.layers]
            values = [layer.values.new_zeros((len(first), *layer.values.shape[1:2], width, layer.values.shape[3]))
                      for layer in part.layers]
            logits = out.logits.new_zeros((len(first), out.logits.shape[-1]))
        index = torch.tensor(group, device=rows.device)
        for i, layer in enumerate(part.layers):
            keys[i][index, :, width - cut:] = layer.keys
            values[i][index, :, width - cut:] = layer.values
        logits[index] = out.logits[:, -1]
    for i in range(len(keys)):
        kv.update(keys[i], values[i], i)  # public Cache API: a static cache writes them at columns 0..width-1
    if inverse is not None:
        kv.reorder_cache(inverse)
        logits = logits[inverse]
    return logits


def prefill_groups(lengths: list[int], width: int, most: int = 4, saving: float = 0.25) -> list[list[int]]:
    """Indices of `lengths` in up to `most` length-sorted groups of equal count, when cutting each group to its
    own longest prompt saves at least `saving` of the batch's padded positions (every forward call costs
    something too); else one group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    count = min(most, len(order) // 4) or 1  # groups of four rows at least
    size = -(-len(order) // count)
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    cost = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    return groups if len(groups) > 1 and cost <= (1 - saving) * len(order) * width else [order]


def pads_left_safely(model) -> bool:
    """Whether left padding leaves each row's tokens as they are unpadded: a decoder-only model whose positions
    follow the attention mask (its forward takes `position_ids`, which generate and the loop fill from the mask)
    or one of llmcycle's sequence models (pads leave the state as it was). Not an encoder-decoder, nor a
    prompt-learning adapter (its virtual tokens go before the padding)."""
    from components.lib.sequence_models import SequenceLMPreTrainedModel

    base = _base(model)
    peft = getattr(model, "peft_config", None)
    if getattr(base.config, "is_encoder_decoder", False) or \
            (peft and any(getattr(c, "is_prompt_learning", False) for c in peft.values())):
        return False
    return isinstance(base, SequenceLMPreTrainedModel) or "position_ids" in inspect.signature(base.forward).parameters


def line_end_ids(tokenizer) -> list[int]:
    """Token ids whose text contains a newline, and EOS: the tokens that end a one-line answer (found once per
    tokenizer and size: decoding every id took 24 ms for 2,048 ids, once per task before)."""
    key = (len(tokenizer), tokenizer.eos_token_id)
    try:
        known = _LINE_ENDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced
        known = {}
    if key not in known:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, text in enumerate(texts) if "\n" in text] + [tokenizer.eos_token_id]
        known[key] = [i for i in ids if i is not None]
    return known[key]


def step_decoder(ctx) -> Decoder:
    """The Decoder of a step's `trainer.generation` (the `auto` defaults for a context without a trainer)."""
    settings = getattr(getattr(ctx, "trainer", None), "generation", None)
    return Decoder(settings.cache, settings.compile) if settings is not None else Decoder()
