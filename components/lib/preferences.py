"""Preference pairs {prompt, chosen, rejected, score?}: from JSONL files, another step, or built in.

`{builtin: preferences}` pairs come from the task mixture (`components/lib/tasks.py`) with a ground truth:
the correct completion against a corrupted one (a near miss of the same shape, so that length or
format cannot give the answer away), plus polite against rude wording of the same request. Chat rows
(`messages`, or `chosen`/`rejected` as message lists, TRL's conversational format) are rendered to text
with `text.render_chat` (the chat template, else plain `Human:`/`Assistant:` turns).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from components.lib import tasks as T
from components.lib import datasources
from components.lib.datasources import Draws
from components.lib.io import expand
from components.lib.text import encode_completion, render_chat
from schemas.data import PreferenceDataSpec

DEFAULT_TASKS = ["copy", "reverse", "capitalize", "count", "larger", "sentiment", "polite"]
"""`add` is left out: its held-out pairs are unseen facts, so no reward model can rank them."""


def _shuffled_words(answer: str, rng: random.Random) -> str:
    words = answer.split()
    if len(set(words)) < 2:
        return " ".join(words + [rng.choice(T.WORDS)])
    out = words[:]
    while out == words:
        rng.shuffle(out)
    return " ".join(out)


def _swap_word(answer: str, rng: random.Random) -> str:
    words = answer.split()
    i = rng.randrange(len(words))
    words[i] = rng.choice([w for w in T.WORDS if w != words[i].lower()])
    return " ".join(words)


def _corrupt(row: dict, rng: random.Random) -> str:
    """A wrong answer close to the right one."""
    task, answer, prompt = row["task"], row["answer"], row["prompt"]
    if task in ("copy", "reverse"):
        return _swap_word(answer, rng) if rng.random() < 0.5 else _shuffled_words(answer, rng)
    if task == "capitalize":
        return answer.lower() if rng.random() < 0.5 else _swap_word(answer, rng).title()
    if task in ("count", "add"):
        return str(max(0, int(answer) + rng.choice([-2, -1, 1, 2])) if answer != "0" else 1)
    if task == "larger":
        a, b = prompt.split("Larger: ", 1)[1].split("\n", 1)[0].split(" or ")
        return a if b == answer else b
    if task == "sentiment":
        return "negative" if answer == "positive" else "positive"
    if task == "polite":
        return "B" if answer == "A" else "A"
    return _swap_word(answer, rng)


def builtin_pairs(seed: int, split: str, n_per_task: int, tasks: list[str] | None = None) -> list[dict]:
    """Correct vs corrupted answers on the task mixture, and polite vs rude wording (held-out keys for eval)."""
    rng = random.Random(f"{seed}|{split}|preferences")
    rows = []
    for row in T.make_examples(seed, split, n_per_task, tasks or DEFAULT_TASKS):
        wrong = _corrupt(row, rng)
        rows.append({"prompt": row["prompt"], "chosen": f" {row['answer']}\n", "rejected": f" {wrong}\n",
                     "task": row["task"]})
    rows += _wording_pairs(seed, split, n_per_task, rng)
    rng.shuffle(rows)
    return rows


def _wording_pairs(seed: int, split: str, n: int, rng: random.Random) -> list[dict]:
    """Ask for a request to be made: the polite wording is preferred to the rude one."""
    rows, seen = [], set()
    for _ in range(200 * n):
        if len(rows) == n:
            break
        key = (rng.choice(T.POLITE), rng.choice(T.RUDE), rng.choice(T.REQUESTS))
        if T.held_out(seed, "wording", key) != (split == "eval") or (split == "eval" and key in seen):
            continue
        seen.add(key)
        polite, rude, request = key
        rows.append({"prompt": f"Ask someone to {request}.\nAnswer:", "chosen": f" {polite.capitalize()} "
                     f"{request}.\n", "rejected": f" {rude.capitalize()} {request}.\n", "task": "wording"})
    return rows


def normalize_pair(row: dict, tokenizer=None) -> dict:
    """One preference row as plain text {prompt, chosen, rejected, score}; a clear error when malformed.

    Chat rows (TRL's conversational format: `chosen`/`rejected` as message lists after a shared `prompt`
    list) are rendered with `text.render_chat`; the replies are what follows the rendered prompt.
    """
    where = row.get("_where", "row")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: preference rows need 'chosen' and 'rejected' (missing {', '.join(missing)}); "
                         f"got keys {', '.join(sorted(k for k in row if k != '_where')) or 'none'}")
    prompt, chosen, rejected = row.get("prompt", ""), row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # conversational: the prompt is the shared prefix of messages
        prompt_msgs = prompt if isinstance(prompt, list) else []
        prompt = render_chat(tokenizer, prompt_msgs, add_generation_prompt=bool(prompt_msgs))
        chosen = render_chat(tokenizer, prompt_msgs + chosen)[len(prompt):]
        rejected = render_chat(tokenizer, prompt_msgs + rejected)[len(prompt):]
    elif isinstance(prompt, list):
        prompt = render_chat(tokenizer, prompt, add_generation_prompt=True)
    score = float(row.get("score", 1.0))
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"{where}: 'score' is the probability that chosen is better, in [0, 1]; got {score}")
    return {"prompt": str(prompt), "chosen": str(chosen), "rejected": str(rejected), "score": score}


def load_preferences(data: PreferenceDataSpec, seed: int, resolve: Callable[[str], Path],
                     step_data: Path | Callable[[str], Path] | None = None,
                     tokenizer=None) -> tuple[list[dict] | Draws, list[dict]]:
    """(train, held-out) preference rows for a `data:` section; `step_data`: the data folder of `data.step`, or
    a function giving each step's (a mixture may read several). The training pairs are a list (for a mixture,
    its drawn pass: `datasources.MixedRows`), or endless `datasources.Draws` when a source is streamed; a
    mixture's held-out pairs are every source's own, concatenated."""
    folder = step_data if callable(step_data) else (lambda name: step_data)
    entries = data.mixture or [data]
    sources = [datasources.Source(e.source_name() if data.mixture else "data", getattr(e, "weight", 1.0),
                                  *_source_pairs(e, data, seed, resolve, folder, tokenizer,
                                                 f"data.mixture[{i}]" if data.mixture else "data"))
               for i, e in enumerate(entries)]
    if not any(s.streamed for s in sources) and not all(s.train for s in sources):
        empty = next(i for i, s in enumerate(sources) if not s.train)
        raise ValueError(f"data{f'.mixture[{empty}]' if data.mixture else ''}: no training preference pairs left "
                         "after holding out the eval rows")
    return (datasources.training_rows(sources, seed, data.mixture_size, mixed=data.mixture is not None),
            datasources.held_rows(sources))


def _source_pairs(source, data: PreferenceDataSpec, seed: int, resolve: Callable[[str], Path],
                  folder: Callable[[str], Path], tokenizer, field: str):
    """(training, held-out) pairs of one source: the builtin pairs, JSONL files, or a step's preferences.jsonl."""
    if source.builtin == "preferences":
        train = builtin_pairs(seed, "train", source.n_per_task, source.tasks)
        held = builtin_pairs(seed, "eval", max(8, source.n_per_task // 4), source.tasks)
        return [normalize_pair(r) for r in train], [normalize_pair(r) for r in held]
    if source.step is not None:
        path = Path(folder(source.step)) / "preferences.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{field}.step: step '{source.step}' wrote no preferences.jsonl in its data "
                                    f"output ({path.parent})")
        paths, evals = [path], []
    else:
        paths = expand(source.files, resolve, f"{field}.files")
        evals = expand(source.eval_files, resolve, f"{field}.eval_files") if source.eval_files else []
    return datasources.file_source(paths, evals, data.eval_fraction, seed, data.stream, field,
                                   lambda row: normalize_pair(row, tokenizer))


def prompt_row(row: dict, tokenizer=None) -> dict:
    """A prompt row {prompt, ...} (for rollouts); chat `messages`, or a message-list prompt, rendered to text."""
    if "prompt" not in row and "messages" not in row:
        raise ValueError(f"{row.get('_where', 'row')}: prompt rows need 'prompt' (or chat 'messages'); got keys "
                         f"{', '.join(sorted(k for k in row if k != '_where')) or 'none'}")
    out = dict(row)
    messages = row["prompt"] if isinstance(row.get("prompt"), list) else row.get("messages")
    if messages is not None:
        if messages and messages[-1].get("role") == "assistant":  # a full chat: prompt with everything before
            messages = messages[:-1]
        out["prompt"] = render_chat(tokenizer, messages, add_generation_prompt=True)
    return out


# -- tokens ----------------------------------------------------------------------------------------


def encode_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Per row: prompt+chosen and prompt+rejected ids (each reply ends with EOS, cut with `text.truncate_pair`),
    their completion masks, and the soft label. The one encoding of pairs (reward_model and dpo)."""
    out = []
    for row in rows:
        item = {"score": float(row.get("score", 1.0))}
        for side in ("chosen", "rejected"):
            prompt, reply = encode_completion(tokenizer, row["prompt"], row[side], max_length)
            item[side] = (prompt + reply, [0] * len(prompt) + [1] * len(reply))
        out.append(item)
    return out


def encode_points(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Per row {prompt, completion, target}: prompt+completion ids (cut as `encode_pairs` cuts) and the target
    reward, for pointwise reward-model training on ratings."""
    out = []
    for row in rows:
        prompt, reply = encode_completion(tokenizer, row["prompt"], row["completion"], max_length)
        out.append({"ids": prompt + reply, "target": float(row["target"])})
    return out


def collate_points(items: list[dict], pad_id: int) -> dict:
    """One right-padded batch of single sequences with their target rewards."""
    import torch

    width = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, :len(it["ids"])] = torch.tensor(it["ids"])
        attn[i, :len(it["ids"])] = 1
    return {"input_ids": ids, "attention_mask": attn, "target": torch.tensor([it["target"] for it in items])}


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """One right-padded batch: the chosen rows first, then the rejected rows (one forward pass for both)."""
    import torch

    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (row, mask) in enumerate(seqs):
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        comp[i, :len(row)] = torch.tensor(mask)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
            "score": torch.tensor([it["score"] for it in items])}
