"""Decode text from a causal LM with transformers' `generate` (greedy, sampling, top-k, top-p, beam search).

Decoding itself is transformers' (temperature, `TopKLogitsWarper`, `TopPLogitsWarper`, `BeamSearchScorer`
semantics; Holtzman et al. 2020 for top-p); this module only maps a strategy name onto a GenerationConfig
and batches prompts with left padding so every row's continuation starts at the same column; greedy decoding and
plain sampling go through components/lib/decoding.py (the same tokens, faster). An encoder-decoder
(T5) reads the prompt in its encoder, and its output is the decoder's alone: all of it is the continuation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from components.lib.decoding import Decoder, line_end_ids, pads_left_safely
from components.lib.models import evaluating
from components.lib.text import encode, pad_token, start_token

STRATEGIES = ("greedy", "sample", "top_k", "top_p", "beam")


def decoding_kwargs(strategy: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    num_beams: int = 4, length_penalty: float = 1.0, **_: Any) -> dict:
    """GenerationConfig fields for a strategy; sampling strategies switch off every warper they do not use."""
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": temperature}  # HF defaults top_k=50
    if strategy == "greedy":
        return {"do_sample": False, "num_beams": 1}
    if strategy == "sample":
        return sampling
    if strategy == "top_k":
        if top_k < 1:
            raise ValueError(f"strategy top_k needs top_k >= 1, got {top_k}")
        return {**sampling, "top_k": top_k}
    if strategy == "top_p":
        if not 0 < top_p <= 1:
            raise ValueError(f"strategy top_p needs 0 < top_p <= 1, got {top_p}")
        return {**sampling, "top_p": top_p}
    if strategy == "beam":
        if num_beams < 1:
            raise ValueError(f"strategy beam needs num_beams >= 1, got {num_beams}")
        return {"do_sample": False, "num_beams": num_beams, "length_penalty": length_penalty, "early_stopping": True}
    raise ValueError(f"unknown decoding strategy '{strategy}'; expected one of {', '.join(STRATEGIES)}")


def encode_prompts(tokenizer, prompts: list[str], device=None) -> dict:
    """Left-padded input_ids/attention_mask; an empty prompt starts from the start token (BOS, else EOS)."""
    rows = [encode(tokenizer, p) or [start_token(tokenizer)] for p in prompts]
    ids, mask = left_padded(rows, pad_token(tokenizer), device)
    return {"input_ids": ids, "attention_mask": mask}


def left_padded(rows: list[list[int]], pad: int, device=None):
    """(input_ids, attention_mask) of token rows padded on the left to the longest."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def generation_config(tokenizer, strategy: str = "greedy", max_new_tokens: int = 32, min_new_tokens: int = 0,
                      **opts: Any):
    """A GenerationConfig for `strategy` with the tokenizer's special ids."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                            pad_token_id=pad_token(tokenizer),
                            eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id, **decoding_kwargs(strategy, **opts))


def generate_texts(model, tokenizer, prompts: list[str], strategy: str = "greedy", max_new_tokens: int = 32,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
                   length_penalty: float = 1.0, seed: int = 0, batch_size: int = 16,
                   min_new_tokens: int = 0, decoder: Decoder | None = None) -> list[str]:
    """Generate a continuation for each prompt; return only the generated text, not the prompt. `decoder`
    (components/lib/decoding.py; default: `auto` choices) decodes greedy and plain sampling; the other strategies
    are transformers' generate."""
    import torch

    config = generation_config(tokenizer, strategy, max_new_tokens, min_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty)
    device = next(model.parameters()).device
    texts: list[str] = []
    with evaluating(model):
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                batch = encode_prompts(tokenizer, prompts[i:i + batch_size], device)
                out = (decoder or Decoder()).generate(model, batch["input_ids"], batch["attention_mask"], config)
                new = out if _is_seq2seq(model) else out[:, batch["input_ids"].shape[1]:]
                texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


def generate_ids(model, tokenizer, prompts: list[str], strategy: str = "greedy", max_new_tokens: int = 32,
                 seed: int = 0, **opts: Any):
    """Like generate_texts but return the full `generate` output (sequences and, for beams, scores)."""
    import torch

    config = generation_config(tokenizer, strategy, max_new_tokens, **opts)
    config.return_dict_in_generate, config.output_scores = True, True
    with evaluating(model), torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        batch = encode_prompts(tokenizer, prompts, next(model.parameters()).device)
        return model.generate(**batch, generation_config=config), batch


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def answer_batches(encoded: list[list[int]], batch_size: int, pad_left: bool) -> list[list[int]]:
    """Indices of `encoded` in batches: sorted by length and cut every `batch_size` (left padding within a batch
    of similar lengths), or, without `pad_left`, one length per batch (no padding at all)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    if pad_left:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i in order:
        by_length[len(encoded[i])].append(i)
    return [members[i:i + batch_size] for members in by_length.values() for i in range(0, len(members), batch_size)]


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 64,
                     reserve: int = 0, one_line: bool = True, decoder: Decoder | None = None) -> list[str]:
    """Greedy one-line answers: each prompt's continuation up to its first newline or EOS (`one_line` False:
    up to EOS), decoded by `decoder` (components/lib/decoding.py; default: `auto` choices).

    Prompts are sorted by token length and batched with left padding, one prefill per batch, where padding
    leaves a row's tokens unchanged (decoding.pads_left_safely); other models get batches of one length, which
    need no padding. A batch stops as soon as every row has ended its line. `reserve` leaves room for
    prompt-tuning's virtual tokens.
    """
    import torch
    from transformers import GenerationConfig

    from components.lib.models import context_length

    limit = context_length(model) - (0 if _is_seq2seq(model) else max_new_tokens) - reserve
    encoded = [(encode(tokenizer, p) or [start_token(tokenizer)])[-limit:] for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token(tokenizer),
                              eos_token_id=tokenizer.eos_token_id)
    stop = line_end_ids(tokenizer) if one_line else []
    decoder = decoder or Decoder()
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    with evaluating(model), torch.inference_mode():
        for chunk in answer_batches(encoded, batch_size, pads_left_safely(model)):
            ids, mask = left_padded([encoded[i] for i in chunk], pad_token(tokenizer), device)
            out = decoder.generate(model, ids, mask, config, stop)
            for i, row in zip(chunk, out if _is_seq2seq(model) else out[:, ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers[i] = text.split("\n", 1)[0] if one_line else text.strip()
    return answers
