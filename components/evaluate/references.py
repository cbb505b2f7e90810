"""Replies scored against references (ROUGE, BLEU, chrF, exact match) and by a judge model.

The rows come from the builtin mixture's held-out answers, JSONL files or the spec; the model replies greedily
(components/lib/generation.generate_answers), and components/lib/reference_metrics.py scores the replies with
rouge-score and sacrebleu. The judge (components/lib/judging.py, the constitutional step's code) reads a
multiple-choice question about each reply:
- pairwise: "(A) <reply> (B) <reference>: which is better?"; score = p(reply better);
- pointwise: "<reply>: good? (A) yes (B) no"; score = p(good).
With `swap_positions` every question is also asked with the two options swapped and the two labels averaged;
position bias = mean p(A) - 0.5 over every question asked (0: no preference for the first position).
"""

from __future__ import annotations

import statistics

from components.lib import reference_metrics
from components.lib.evaluation import exact_match
from components.lib.generation import generate_answers
from components.lib.io import read_jsonl_files
from components.lib.judging import judge
from components.lib.tasks import make_examples

PAIRWISE = "Request: {prompt}\n\nReply (A): {a}\nReply (B): {b}\n\n{rubric} Which reply is better, A or B?\nAnswer:"
POINTWISE = "Request: {prompt}\n\nReply: {reply}\n\n{rubric} {choices}\nAnswer:"
YES_NO, NO_YES = "(A) yes (B) no", "(A) no (B) yes"


def load_rows(spec, seed: int, resolve) -> list[dict]:
    """{prompt, reference} rows, `reference` a list of strings."""
    if spec.builtin is not None:
        rows = [{"prompt": r["prompt"], "reference": r["answer"], "task": r["task"]}
                for r in make_examples(seed, "eval", spec.n_per_task, spec.builtin_tasks())]
    elif spec.files is not None:
        rows = read_jsonl_files(spec.files, resolve, "references.files")
    else:
        rows = [e.model_dump() for e in spec.examples]
    for row in rows:
        row["reference"] = reference_metrics.reference_lists([row["reference"]])[0]
    return rows


def score_replies(model, tokenizer, spec, rows: list[dict], decoder=None
                  ) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """Generate a reply per row and score it; (metrics `references/<m>`, library settings, table rows).
    `decoder`: trainer.generation's choices (components/lib/decoding.py)."""
    replies = generate_answers(model, tokenizer, [r["prompt"] for r in rows], spec.max_new_tokens,
                               one_line=spec.stop == "line", decoder=decoder)
    bleu = {"tokenize": spec.bleu.tokenize, "smooth_method": spec.bleu.smooth_method,
            "lowercase": spec.bleu.lowercase}
    corpus, settings, per_row = reference_metrics.score(replies, [r["reference"] for r in rows], spec.metrics,
                                                        spec.rouge.use_stemmer, bleu,
                                                        {"word_order": spec.chrf.word_order})
    metrics = {f"references/{k}": v for k, v in corpus.items()} | {"references/rows": float(len(rows))}
    table = [{"prompt": r["prompt"], "reference": r["reference"][0] if len(r["reference"]) == 1 else r["reference"],
              "reply": reply, **({"task": r["task"]} if "task" in r else {}), **scores}
             for r, reply, scores in zip(rows, replies, per_row)]
    return metrics, settings, table


def _fill(template: str, **slots: str) -> str:
    for key, value in slots.items():
        template = template.replace("{" + key + "}", value)
    return template


def judge_replies(judge_model, tokenizer, spec, table: list[dict]) -> dict[str, float]:
    """Judge every reply (adds `judge_score` to each table row); metrics `judge/score`, `judge/agreement`,
    `judge/position_bias`, `judge/questions`."""
    orders = [False, True] if spec.swap_positions else [False]
    texts, plan = [], []  # plan: (row index, swapped)
    for i, row in enumerate(table):
        prompt, reply = row["prompt"].strip(), row["reply"].strip()
        reference = row["reference"] if isinstance(row["reference"], str) else row["reference"][0]
        for swapped in orders:
            if spec.mode == "pairwise":
                a, b = (reference, reply) if swapped else (reply, reference)
                texts.append(_fill(spec.template or PAIRWISE, rubric=spec.rubric, prompt=prompt, a=a, b=b))
            else:
                texts.append(_fill(spec.template or POINTWISE, rubric=spec.rubric, prompt=prompt, reply=reply,
                                   choices=NO_YES if swapped else YES_NO))
            plan.append((i, swapped))
    p_a = judge(judge_model, tokenizer, texts, spec.options, spec.batch_size)
    per_row: dict[int, list[float]] = {}
    for (i, swapped), p in zip(plan, p_a):
        per_row.setdefault(i, []).append(1 - p if swapped else p)  # p(reply better) / p(reply good)
    agree = []
    for i, row in enumerate(table):
        row["judge_score"] = statistics.fmean(per_row[i])
        refs = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
        correct = any(exact_match(row["reply"], r) for r in refs)
        if spec.mode == "pointwise":
            agree.append((row["judge_score"] >= 0.5) == correct)
        elif not correct:  # the reference is known to be the better reply
            agree.append(row["judge_score"] < 0.5)
    out = {"judge/score": statistics.fmean(r["judge_score"] for r in table),
           "judge/position_bias": statistics.fmean(p_a) - 0.5, "judge/questions": float(len(texts))}
    if agree:
        out["judge/agreement"] = statistics.fmean(map(float, agree))
    return out
