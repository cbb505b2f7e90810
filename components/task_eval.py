"""Task accuracy (exact match, zero- and few-shot, greedy decoding) and perplexity on pretraining
validation tokens: the scores `finetune` reports for the base and the tuned model (the forgetting
delta), and that `evaluate` can compute as a step of its own.

Entry points: `score_model` (all scores of one model under one label), `forgetting_deltas` (tuned minus
base), `task_accuracy`, `pretrain_perplexity`, `generate_answers`. Few-shot prompts put `shots` solved
training rows of the same task before the question (Brown et al. 2020).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import torch

from components.tasks import is_correct, normalize


class StopAtLineEnd:
    """Stop each sequence once it produced EOS or a token containing a newline (answers are one line)."""

    def __init__(self, tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, text in enumerate(texts) if "\n" in text] + [tokenizer.eos_token_id]
        self.ids = torch.tensor([i for i in ids if i is not None])

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


def context_limit(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 1024)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 64,
                     reserve: int = 0) -> list[str]:
    """Greedy continuations, cut at the first newline or EOS.

    Prompts are grouped by token length so no batch needs padding: left padding depends on each
    model's position handling, equal lengths do not. `reserve` leaves room for prompt-tuning tokens.
    """
    from transformers import StoppingCriteriaList

    was_training = model.training
    model.eval()
    limit = context_limit(model) - max_new_tokens - reserve
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-limit:] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    stop = StoppingCriteriaList([StopAtLineEnd(tokenizer)])
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for length, members in by_length.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, stopping_criteria=stop, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(chunk, out[:, length:]):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).split("\n", 1)[0]
    model.train(was_training)
    return answers


def answer_of(row: dict) -> str:
    """The expected answer: `answer` where the row has one, else its completion."""
    return str(row["answer"]) if "answer" in row else normalize(str(row["completion"]))


def few_shot_prompt(row: dict, pool: dict[str, list[dict]], shots: int, rng: random.Random) -> str:
    """`shots` solved rows of the same task, then the question."""
    demos = pool.get(row.get("task", "data"), [])
    picked = rng.sample(demos, min(shots, len(demos))) if shots else []
    text = "".join(d["prompt"] + d["completion"] + ("" if d["completion"].endswith("\n") else "\n") for d in picked)
    return text + row["prompt"]


def task_accuracy(model, tokenizer, rows: list[dict], shots: int = 0, shot_rows: list[dict] | None = None,
                  max_new_tokens: int = 24, seed: int = 0, reserve: int = 0) -> tuple[dict[str, float], list[dict]]:
    """({"accuracy": overall, "<task>": per task}, predictions) on rows of {prompt, completion, answer?, task?}."""
    pool: dict[str, list[dict]] = defaultdict(list)
    for r in shot_rows or []:
        pool[r.get("task", "data")].append(r)
    rng = random.Random(seed)
    prompts = [few_shot_prompt(r, pool, shots, rng) for r in rows]
    # Generating past the longest answer cannot turn a wrong answer right; stop early to save time.
    longest = max((len(tokenizer(" " + answer_of(r), add_special_tokens=False)["input_ids"]) for r in rows), default=0)
    generated = generate_answers(model, tokenizer, prompts, min(max_new_tokens, longest + 2), reserve=reserve)
    hits: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    for row, text in zip(rows, generated):
        ok = is_correct({"answer": answer_of(row)}, text)
        hits[row.get("task", "data")].append(ok)
        predictions.append({"task": row.get("task", "data"), "shots": shots, "prompt": row["prompt"],
                            "answer": answer_of(row), "generated": text, "correct": ok})
    scores = {task: sum(v) / len(v) for task, v in sorted(hits.items())}
    scores["accuracy"] = sum(map(sum, hits.values())) / max(1, len(rows))
    return scores, predictions


@torch.no_grad()
def pretrain_perplexity(model, token_dir: str | Path, batches: int = 8, batch_size: int = 16,
                        context: int | None = None) -> float:
    """exp(mean next-token loss) on the first blocks of the `val` token file (the train tail if empty)."""
    from components.data import BlockDataset, read_tokens

    context = min(context or 256, context_limit(model))
    tokens = read_tokens(Path(token_dir), "val")
    if len(tokens) < context * 2:
        train = read_tokens(Path(token_dir), "train")
        tokens = train[-max(len(train) // 10, context * 2):]
    data = BlockDataset(tokens, context)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(data), batches * batch_size), batch_size):
        ids = torch.stack([data[i] for i in range(start, min(start + batch_size, len(data)))]).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        total, count = total + float(loss) * ids.numel(), count + ids.numel()
    model.train(was_training)
    return math.exp(total / max(1, count))


def score_model(model, tokenizer, rows: list[dict], label: str, shots: tuple[int, ...] = (0, 3),
                shot_rows: list[dict] | None = None, token_dir: str | Path | None = None, perplexity_batches: int = 8,
                max_new_tokens: int = 24, seed: int = 0, reserve: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Metrics `tasks/<label>/<k>shot/{accuracy,<task>}` and `pretrain_val/<label>/perplexity`, and predictions."""
    metrics: dict[str, float] = {}
    predictions: list[dict] = []
    for k in dict.fromkeys(shots):
        scores, preds = task_accuracy(model, tokenizer, rows, k, shot_rows, max_new_tokens, seed, reserve)
        metrics.update({f"tasks/{label}/{k}shot/{name}": v for name, v in scores.items()})
        predictions += [{"model": label, **p} for p in preds]
    if token_dir is not None:
        metrics[f"pretrain_val/{label}/perplexity"] = pretrain_perplexity(model, token_dir, perplexity_batches)
    return metrics, predictions


def forgetting_deltas(metrics: dict[str, float], base: str = "base", tuned: str = "tuned") -> dict[str, float]:
    """Tuned minus base: `tasks/gain/<k>shot/...` and `forgetting/perplexity_delta` (positive: forgot)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(f"tasks/{tuned}/"):
            twin = key.replace(f"tasks/{tuned}/", f"tasks/{base}/", 1)
            if twin in metrics:
                out[key.replace(f"tasks/{tuned}/", "tasks/gain/", 1)] = value - metrics[twin]
    b, t = metrics.get(f"pretrain_val/{base}/perplexity"), metrics.get(f"pretrain_val/{tuned}/perplexity")
    if b is not None and t is not None:
        out["forgetting/perplexity_delta"] = t - b
        out["forgetting/perplexity_ratio"] = t / b
    return out
