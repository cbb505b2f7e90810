"""RL-CAI labels: the feedback model answers a principle's multiple-choice question about two replies.

The soft label is p_A = softmax(l_A, l_B)[0] over the log-probs of the two options (summed over their
tokens) after the answer cue (Bai et al. 2022, §4.1); the A/B order is drawn at random per pair so that a judge's position bias
averages out instead of becoming a preference.
"""

from __future__ import annotations

import random
import statistics

import torch

from components.lib.models import evaluating
from schemas.constitution import Principle
from schemas.steps.constitutional import FeedbackSpec


def option_ids(tokenizer, options: tuple[str, str]) -> tuple[list[int], list[int]]:
    """The token ids of each option (an option may span several tokens: its log-prob is their sum)."""
    ids = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in options]
    if not all(ids):
        raise ValueError(f"feedback.options: {options} must each encode to at least one token")
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


def comparison_text(template: str, question: str, prompt: str, a: str, b: str) -> str:
    return template.replace("{prompt}", prompt).replace("{question}", question).replace("{a}", a).replace("{b}", b)


def label_pairs(model, tokenizer, items: list[dict], principles: list[Principle], feedback: FeedbackSpec,
                seed: int, batch_size: int = 16) -> list[dict]:
    """Label {prompt, first, second[, reference]} items; rows come back oriented so `chosen` is the one the judge
    prefers and `score` = its probability (>= 0.5). `reference` True means `first` is known to be better."""
    rng = random.Random(f"{seed}|labels")
    plan = [(rng.choice(principles), rng.random() < 0.5) for _ in items]
    texts = [comparison_text(feedback.template, p.comparison, it["prompt"], *((it["second"], it["first"]) if swap
                                                                             else (it["first"], it["second"])))
             for it, (p, swap) in zip(items, plan)]
    p_a = judge(model, tokenizer, texts, feedback.options, batch_size)
    rows = []
    for it, (principle, swap), pa in zip(items, plan, p_a):
        p_first = 1 - pa if swap else pa
        first_wins = p_first >= 0.5
        rows.append({"prompt": it["prompt"], "chosen": it["first"] if first_wins else it["second"],
                     "rejected": it["second"] if first_wins else it["first"],
                     "score": p_first if first_wins else 1 - p_first, "principle": principle.name,
                     "p_a": pa, "first_shown_as": "B" if swap else "A", "p_first": p_first,
                     **({"reference_agrees": first_wins} if it.get("reference") else {})})
    return rows


def label_stats(rows: list[dict]) -> dict[str, float]:
    """Mean and spread of the labels, A/B position bias, and agreement with reference pairs where known."""
    if not rows:
        return {}
    p_first = [r["p_first"] for r in rows]
    stats = {"labels/mean_score": statistics.fmean(r["score"] for r in rows),
             "labels/std_p": statistics.pstdev(p_first),
             "labels/position_bias": statistics.fmean(r["p_a"] for r in rows) - 0.5,
             "labels/pairs": float(len(rows))}
    known = [r for r in rows if "reference_agrees" in r]
    if known:
        stats["labels/agreement"] = statistics.fmean(float(r["reference_agrees"]) for r in known)
        stats["labels/reference_p_mean"] = statistics.fmean(r["p_first"] for r in known)
        stats["labels/reference_pairs"] = float(len(known))
    return stats
