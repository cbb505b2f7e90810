"""A model as judge: it answers a multiple-choice question, and its label is the softmax over the options.

p_A = softmax(l_A, l_B)[0], where l_X is the summed log-probability of option X's tokens after the question's
answer cue (Bai et al. 2022, §4.1, for RL-CAI's feedback model; the same reading of a judge's answer as
Zheng et al. 2023 use for LLM-as-judge with log-probabilities). One implementation for the constitutional
step's preference labels and `evaluate`'s judge.
"""

from __future__ import annotations

import torch

from components.lib.models import evaluating


def option_ids(tokenizer, options: tuple[str, str]) -> tuple[list[int], list[int]]:
    """The token ids of each option (an option may span several tokens: its log-prob is their sum)."""
    ids = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in options]
    if not all(ids):
        raise ValueError(f"options: {options} must each encode to at least one token")
    return ids[0], ids[1]


def soft_label(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """p_A = softmax(l_A, l_B)[0]; p_B = 1 - p_A."""
    return torch.softmax(torch.stack([logp_a, logp_b], dim=-1), dim=-1)[..., 0]


@torch.no_grad()
def option_logps(model, tokenizer, texts: list[str], option: list[int], batch_size: int = 16) -> torch.Tensor:
    """log p(option tokens | text) for each text (left padding puts every option in the last columns)."""
    n, out = len(option), []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + option for t in texts[i:i + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1:-1].float().log_softmax(-1)
        out.append(logits.gather(-1, ids[:, -n:].unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.cat(out)


def judge(model, tokenizer, texts: list[str], options: tuple[str, str], batch_size: int = 16) -> list[float]:
    """p_A for each multiple-choice text."""
    a, b = option_ids(tokenizer, options)
    with evaluating(model):
        return soft_label(option_logps(model, tokenizer, texts, a, batch_size),
                          option_logps(model, tokenizer, texts, b, batch_size)).tolist()
