"""Prompted tasks, zero- and few-shot: multiple choice by log-likelihood, or exact match of a generated answer.

Few-shot prompts put `shots` solved examples of the same task before the question (Brown et al. 2020);
the examples are the ones following the question in the task's list, so a question never solves itself.
Continuations are appended to prompts exactly as written, so a choice or answer carries its own leading
space (" Paris").
"""

from __future__ import annotations

import importlib.util
import json

import torch

from components.context import StepContext
from schemas.steps.evaluate import TasksSpec


def load_tasks(spec: TasksSpec, ctx: StepContext) -> list[dict]:
    """Tasks as {name, type, rows, max_new_tokens}; rows hold prompt, answer, completion, choices?."""
    tasks = []
    for task in spec.items:
        rows = [e.model_dump() for e in task.examples] if task.examples is not None else _read_jsonl(ctx, task)
        for r in rows:
            r.setdefault("completion", r["answer"])
        tasks.append({"name": task.name, "type": task.type, "rows": rows, "max_new_tokens": task.max_new_tokens})
    if spec.builtin == "tasks":
        tasks += builtin_tasks(spec.n_per_task, ctx.seed, spec.shots)
    return tasks


def _read_jsonl(ctx: StepContext, task) -> list[dict]:
    path = ctx.resolve_path(task.file)
    if not path.is_file():
        raise FileNotFoundError(f"tasks.items '{task.name}': file {path} not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            missing = [k for k in ("prompt", "answer") if k not in row] + \
                (["choices"] if task.type == "choice" and "choices" not in row else [])
            if missing:
                raise ValueError(f"{path}:{n}: row lacks {', '.join(missing)} (task '{task.name}', type {task.type})")
            rows.append(row)
    return rows


def builtin_tasks(n_per_task: int, seed: int, shots: int) -> list[dict]:
    """The project's task mixture (components/tasks.py): eval rows to answer, train rows as shots."""
    if importlib.util.find_spec("components.tasks") is None:
        raise ValueError("tasks.builtin: this installation has no components/tasks.py")
    from components import tasks as mixture

    evals = mixture.make_examples(seed, "eval", n_per_task)
    shots_pool = mixture.make_examples(seed, "train", max(shots, 1) * 2)
    out = []
    for name in dict.fromkeys(r["task"] for r in evals):
        out.append({"name": name, "type": "exact_match", "builtin": True, "max_new_tokens": 16,
                    "rows": [r for r in evals if r["task"] == name],
                    "shots": [r for r in shots_pool if r["task"] == name]})
    return out


def shot_prefix(task: dict, index: int, shots: int, separator: str) -> str:
    """`shots` solved examples of the task (not the question itself) joined before the question."""
    pool = task.get("shots")
    if pool is None:
        rows = task["rows"]
        pool = [rows[(index + j) % len(rows)] for j in range(1, len(rows))]
    chosen = pool[:shots]
    return "".join(r["prompt"] + r["completion"].rstrip("\n") + separator for r in chosen)


@torch.inference_mode()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) under a causal LM."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx_ids + cont_ids])
    logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, len(ctx_ids):]
    return float(logprobs[len(ctx_ids) - 1:].gather(-1, targets[:, None]).sum())


def run_tasks(model, tokenizer, spec: TasksSpec, ctx: StepContext) -> tuple[dict[str, float], list[dict]]:
    """Score every task; return metrics (`task/<name>/accuracy`, `tasks/accuracy`) and one row per question."""
    from components.generation import generate_texts

    metrics, table = {}, []
    for task in load_tasks(spec, ctx):
        prompts = [shot_prefix(task, i, spec.shots, spec.separator) + r["prompt"] for i, r in enumerate(task["rows"])]
        if task["type"] == "choice":
            predictions = []
            for prompt, row in zip(prompts, task["rows"]):
                scores = [continuation_logprob(model, tokenizer, prompt, c) for c in row["choices"]]
                predictions.append(row["choices"][max(range(len(scores)), key=scores.__getitem__)])
            correct = [p == r["answer"] for p, r in zip(predictions, task["rows"])]
        else:
            predictions = generate_texts(model, tokenizer, prompts, "greedy", max_new_tokens=task["max_new_tokens"],
                                         seed=ctx.seed)
            correct = [is_correct(task, r, p) for r, p in zip(task["rows"], predictions)]
        metrics[f"task/{task['name']}/accuracy"] = sum(correct) / max(len(correct), 1)
        table += [{"task": task["name"], "shots": spec.shots, "prompt": r["prompt"], "answer": r["answer"],
                   "prediction": p, "correct": c} for r, p, c in zip(task["rows"], predictions, correct)]
    if table:
        metrics["tasks/accuracy"] = sum(r["correct"] for r in table) / len(table)
    return metrics, table


def is_correct(task: dict, row: dict, generated: str) -> bool:
    """Exact match of the first generated line (trimmed, spaces collapsed) with the answer."""
    if task.get("builtin"):
        from components.tasks import is_correct as builtin_correct

        return builtin_correct(row, generated)
    first = " ".join(generated.strip().split("\n", 1)[0].split()) if generated.strip() else ""
    return first == " ".join(str(row["answer"]).split())
