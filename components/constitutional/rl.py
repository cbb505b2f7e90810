"""RL-CAI labels: the feedback model answers a principle's multiple-choice question about two replies.

The soft label is p_A = softmax(l_A, l_B)[0] over the log-probs of the two options (summed over their
tokens) after the answer cue (Bai et al. 2022, §4.1; components/lib/judging.py, which `evaluate`'s judge
shares); the A/B order is drawn at random per pair so that a judge's position bias
averages out instead of becoming a preference.
"""

from __future__ import annotations

import random
import statistics

from components.lib.judging import judge
from schemas.constitution import Principle
from schemas.steps.constitutional import FeedbackSpec


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
