"""Decode text from a causal LM with transformers' `generate` (greedy, sampling, top-k, top-p, beam search).

Decoding itself is transformers' (temperature, `TopKLogitsWarper`, `TopPLogitsWarper`, `BeamSearchScorer`
semantics; Holtzman et al. 2020 for top-p); this module only maps a strategy name onto a GenerationConfig
and batches prompts with left padding so every row's continuation starts at the same column.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

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
    import torch

    rows = [encode(tokenizer, p) or [start_token(tokenizer)] for p in prompts]
    pad = pad_token(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


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
                   min_new_tokens: int = 0) -> list[str]:
    """Generate a continuation for each prompt; return only the generated text, not the prompt."""
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
                out = model.generate(**batch, generation_config=config)
                new = out[:, batch["input_ids"].shape[1]:]
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


class StopAtLineEnd:
    """Stop each sequence once it produced EOS or a token containing a newline (answers are one line)."""

    def __init__(self, tokenizer):
        import torch

        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, text in enumerate(texts) if "\n" in text] + [tokenizer.eos_token_id]
        self.ids = torch.tensor([i for i in ids if i is not None])

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 64,
                     reserve: int = 0, one_line: bool = True) -> list[str]:
    """Greedy one-line answers: each prompt's continuation up to its first newline or EOS (`one_line` False:
    up to EOS).

    Prompts are grouped by token length so that no batch needs padding (left padding depends on each model's
    position handling, equal lengths do not). `reserve` leaves room for prompt-tuning's virtual tokens.
    """
    import torch
    from transformers import StoppingCriteriaList

    from components.lib.models import context_length

    limit = context_length(model) - max_new_tokens - reserve
    encoded = [(encode(tokenizer, p) or [start_token(tokenizer)])[-limit:] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    stop = StoppingCriteriaList([StopAtLineEnd(tokenizer)] if one_line else [])
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    with evaluating(model):
        with torch.inference_mode():
            for length, members in by_length.items():
                for first in range(0, len(members), batch_size):
                    chunk = members[first:first + batch_size]
                    ids = torch.tensor([encoded[i] for i in chunk], device=device)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=stop,
                                         pad_token_id=pad_token(tokenizer), eos_token_id=tokenizer.eos_token_id)
                    for i, row in zip(chunk, out[:, length:]):
                        text = tokenizer.decode(row, skip_special_tokens=True)
                        answers[i] = text.split("\n", 1)[0] if one_line else text.strip()
    return answers
