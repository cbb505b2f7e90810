"""Decoding checks of ALGORITHMS.md §6 on generate_texts/decoding_kwargs (transformers' generate underneath)."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The for statement", "A class", ""]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from components.lib.models import load_model

    torch.manual_seed(1)
    model, tokenizer = load_model(tiny_lm)
    with torch.no_grad():  # sharpen the random model so that its greedy choices are not near-ties
        model.lm_head.weight.mul_(40)
    return model, tokenizer


def test_greedy_top_k_1_and_one_beam_agree(lm):
    from components.lib.generation import generate_texts

    model, tok = lm
    greedy = generate_texts(model, tok, PROMPTS, "greedy", max_new_tokens=8)
    assert generate_texts(model, tok, PROMPTS, "top_k", max_new_tokens=8, top_k=1, seed=3) == greedy
    assert generate_texts(model, tok, PROMPTS, "beam", max_new_tokens=8, num_beams=1) == greedy
    assert generate_texts(model, tok, PROMPTS, "sample", max_new_tokens=8, temperature=1e-4, seed=5) == greedy
    assert all(isinstance(t, str) for t in greedy) and len(greedy) == 3


def test_batched_left_padding_matches_one_by_one(lm):
    from components.lib.generation import generate_texts

    model, tok = lm
    batched = generate_texts(model, tok, PROMPTS, "greedy", max_new_tokens=6)
    assert batched == [generate_texts(model, tok, [p], "greedy", max_new_tokens=6)[0] for p in PROMPTS]


def test_top_k_vocab_and_top_p_1_change_nothing(lm):
    from components.lib.generation import generate_texts

    model, tok = lm
    plain = generate_texts(model, tok, PROMPTS, "sample", max_new_tokens=8, seed=7)
    assert generate_texts(model, tok, PROMPTS, "top_k", max_new_tokens=8, top_k=len(tok), seed=7) == plain
    assert generate_texts(model, tok, PROMPTS, "top_p", max_new_tokens=8, top_p=1.0, seed=7) == plain
    assert generate_texts(model, tok, PROMPTS, "sample", max_new_tokens=8, seed=8) != plain  # the seed matters


def test_beam_with_length_penalty_0_scores_the_raw_sum_of_log_probs(lm):
    from components.lib.generation import generate_ids

    model, tok = lm
    out, batch = generate_ids(model, tok, ["The for statement"], "beam", max_new_tokens=6, num_beams=3,
                              length_penalty=0.0)
    seq = out.sequences[0]
    start = batch["input_ids"].shape[1]
    with torch.no_grad():
        logp = model(seq[None]).logits[0, :-1].log_softmax(-1)
    new = seq[start:]
    new = new[new != tok.pad_token_id]
    total = logp[start - 1:start - 1 + len(new)].gather(-1, new[:, None]).sum()
    assert out.sequences_scores[0].item() == pytest.approx(total.item(), abs=1e-3)


def test_unknown_strategy_and_bad_options_name_the_field():
    from components.lib.generation import decoding_kwargs

    with pytest.raises(ValueError, match="unknown decoding strategy 'nucleus'.*top_p"):
        decoding_kwargs("nucleus")
    with pytest.raises(ValueError, match="top_k >= 1"):
        decoding_kwargs("top_k", top_k=0)
    assert decoding_kwargs("sample")["top_k"] == 0  # HF's default top_k=50 never leaks into plain sampling
