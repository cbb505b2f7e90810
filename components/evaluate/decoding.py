"""Continuations of the same prompts under each decoding strategy, side by side."""

from __future__ import annotations

from components.lib.decoding import Decoder
from components.lib.generation import generate_texts
from schemas.steps.evaluate import GenerationSpec


def sample_strategies(model, tokenizer, spec: GenerationSpec, seed: int, decoder: Decoder | None = None) -> list[dict]:
    """One row per (strategy, prompt) with the generated text; `decoder`: trainer.generation's choices."""
    rows = []
    for strategy in spec.strategies:
        texts = generate_texts(model, tokenizer, spec.prompts, strategy, max_new_tokens=spec.max_new_tokens,
                               temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                               num_beams=spec.num_beams, length_penalty=spec.length_penalty, seed=seed,
                               decoder=decoder)
        rows += [{"strategy": strategy, "prompt": p, "generated": t} for p, t in zip(spec.prompts, texts)]
    return rows
