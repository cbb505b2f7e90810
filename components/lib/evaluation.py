"""Task accuracy, zero- and few-shot: exact match of a greedy one-line answer, or multiple choice by log-likelihood.

One implementation for `finetune` (the model before and after) and `evaluate`, so the same model on the same
tasks gets the same accuracy in both. Metrics: `tasks/<k>shot/accuracy` (every question counted once) and
`tasks/<k>shot/<task>` (per task).

- **Exact match**: the first line of the greedy continuation, trimmed and with runs of spaces collapsed, equals
  the answer (case-sensitive: the builtin `capitalize` task depends on case). Generation stops at a newline or
  EOS, and after the longest answer's tokens + 2 (no longer continuation can turn a wrong first line right).
- **Choice**: the choice whose continuation has the highest summed log-probability after the prompt (lm-eval's
  `acc`; the choices carry their own leading space, " Paris"); for an encoder-decoder, the decoder's
  log-probability of the choice with the prompt in the encoder (components/lib/seq2seq.py).
- **Few-shot** (Brown et al. 2020): `k` solved examples of the same task, `prompt + completion` each followed by
  the separator, before the question; they come from the task's pool of training examples, taken in turn
  so questions see different examples, and never the question itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from components.lib.generation import generate_answers
from components.lib.models import evaluating
from components.lib.text import encode, start_token

SEPARATOR = "\n\n"
BUILTIN_SHOT_POOL = 16  # training examples per builtin task from which few-shot examples are drawn
BUILTIN_MAX_NEW_TOKENS = 16


@dataclass
class Task:
    """Questions to score: rows {prompt, answer, completion?, choices?}, and a pool of solved examples."""

    name: str
    type: str = "exact_match"  # or "choice"
    rows: list[dict] = field(default_factory=list)
    pool: list[dict] | None = None  # solved examples {prompt, completion}; None: the other rows of the task
    max_new_tokens: int = BUILTIN_MAX_NEW_TOKENS


def normalize(text: str) -> str:
    """The first line, trimmed, with runs of spaces collapsed."""
    return " ".join(text.strip().split("\n", 1)[0].split()) if text.strip() else ""


def exact_match(generated: str, answer: str) -> bool:
    """Whether the first generated line equals the answer, after `normalize` of both."""
    return normalize(generated.lstrip()) == normalize(str(answer))


def builtin_tasks(seed: int, n_per_task: int, tasks: list[str] | None = None) -> list[Task]:
    """The held-out rows of the builtin mixture, one Task each, with the mixture's training rows as shot pools."""
    from components.lib.tasks import make_examples

    evals = make_examples(seed, "eval", n_per_task, tasks)
    pool = make_examples(seed, "train", BUILTIN_SHOT_POOL, tasks)
    return [Task(name, rows=[r for r in evals if r["task"] == name], pool=[r for r in pool if r["task"] == name])
            for name in dict.fromkeys(r["task"] for r in evals)]


def tasks_from_rows(rows: list[dict], pool: list[dict], max_new_tokens: int) -> list[Task]:
    """Exact-match Tasks from {prompt, completion, answer?, task?} rows (finetune's held-out data), with the
    training rows of each task as its pool. A row without `answer` is answered by its completion's first line."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row.get("task", "data")].append({**row, "answer": row.get("answer", normalize(row["completion"]))})
    shots: dict[str, list[dict]] = defaultdict(list)
    for row in pool:
        shots[row.get("task", "data")].append(row)
    return [Task(name, rows=items, pool=shots.get(name, []), max_new_tokens=max_new_tokens)
            for name, items in by_task.items()]


def shot_prefix(task: Task, index: int, k: int, separator: str = SEPARATOR) -> str:
    """`k` solved examples of the task for question `index`, each followed by the separator."""
    if k == 0:
        return ""
    pool = task.pool if task.pool is not None else [r for i, r in enumerate(task.rows) if i != index]
    if not pool:
        return ""
    chosen = [pool[(index * k + j) % len(pool)] for j in range(min(k, len(pool)))]
    return "".join(r["prompt"] + str(r.get("completion", " " + str(r.get("answer", "")))).rstrip("\n") + separator
                   for r in chosen)


@torch.inference_mode()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) under a causal LM; an empty context starts from BOS."""
    if getattr(model.config, "is_encoder_decoder", False):
        from components.lib.seq2seq import continuation_logprob as decoder_logprob

        return decoder_logprob(model, tokenizer, context, continuation)
    ctx_ids = encode(tokenizer, context) or [start_token(tokenizer)]
    cont_ids = encode(tokenizer, continuation)
    ids = torch.tensor([ctx_ids + cont_ids], device=next(model.parameters()).device)
    logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return float(logprobs[len(ctx_ids) - 1:].gather(-1, ids[0, len(ctx_ids):, None]).sum())


def score_tasks(model, tokenizer, tasks: list[Task], shots: int = 0, separator: str = SEPARATOR,
                reserve: int = 0, decoder=None) -> tuple[dict[str, float], list[dict]]:
    """Accuracy per task and overall at `shots`, and one prediction row per question.

    `reserve`: positions kept free for prompt-tuning's virtual tokens; `decoder`: how generated answers are decoded
    (components/lib/decoding.py, default `auto`).
    """
    metrics, predictions = {}, []
    with evaluating(model):
        for task in tasks:
            prompts = [shot_prefix(task, i, shots, separator) + r["prompt"] for i, r in enumerate(task.rows)]
            if task.type == "choice":
                guesses = [max(r["choices"], key=lambda c: continuation_logprob(model, tokenizer, p, c))
                           for p, r in zip(prompts, task.rows)]
                correct = [g == r["answer"] for g, r in zip(guesses, task.rows)]
            else:
                longest = max((len(encode(tokenizer, " " + str(r["answer"]))) for r in task.rows), default=0)
                guesses = generate_answers(model, tokenizer, prompts, min(task.max_new_tokens, longest + 2),
                                           reserve=reserve, decoder=decoder)
                correct = [exact_match(g, r["answer"]) for g, r in zip(guesses, task.rows)]
            metrics[f"tasks/{shots}shot/{task.name}"] = sum(correct) / max(len(correct), 1)
            predictions += [{"task": task.name, "shots": shots, "prompt": r["prompt"], "answer": str(r["answer"]),
                             "prediction": g, "correct": c} for r, g, c in zip(task.rows, guesses, correct)]
    if predictions:
        metrics[f"tasks/{shots}shot/accuracy"] = sum(p["correct"] for p in predictions) / len(predictions)
    return metrics, predictions
