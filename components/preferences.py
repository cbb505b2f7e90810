"""Preference pairs {prompt, chosen, rejected, score?}: from JSONL files, another step, or built in.

`{builtin: preferences}` pairs come from the task mixture (`components/tasks.py`) with a ground truth:
the correct completion against a corrupted one (a near miss of the same shape, so that length or
format cannot give the answer away), plus polite against rude wording of the same request. Chat rows
(`messages`, or `chosen`/`rejected` as message lists, TRL's conversational format) are rendered to text
with the tokenizer's chat template when it has one, else as `role: content` lines.
"""

from __future__ import annotations

import glob
import random

from components import tasks as T
from components.jsonl import iter_lines

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


def render_messages(messages: list[dict], tokenizer=None, generation_prompt: bool = False) -> str:
    """Chat messages as text: the tokenizer's chat template if it has one, else `role: content` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if generation_prompt else "")


def normalize_pair(row: dict, where: str, tokenizer=None) -> dict:
    """One preference row as plain text {prompt, chosen, rejected, score}; a clear error when malformed."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"{where}: preference rows need 'chosen' and 'rejected' (missing {', '.join(missing)}); "
                         f"got keys {', '.join(sorted(row)) or 'none'}")
    prompt, chosen, rejected = row.get("prompt", ""), row["chosen"], row["rejected"]
    if isinstance(chosen, list):  # conversational: the prompt is the shared prefix of messages
        prompt_msgs = prompt if isinstance(prompt, list) else []
        full_c = render_messages(prompt_msgs + chosen, tokenizer)
        full_r = render_messages(prompt_msgs + rejected, tokenizer)
        prompt = render_messages(prompt_msgs, tokenizer, generation_prompt=bool(prompt_msgs))
        chosen, rejected = full_c[len(prompt):], full_r[len(prompt):]
    elif isinstance(prompt, list):
        prompt = render_messages(prompt, tokenizer, generation_prompt=True)
    score = float(row.get("score", 1.0))
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"{where}: 'score' is the probability that chosen is better, in [0, 1]; got {score}")
    return {"prompt": str(prompt), "chosen": str(chosen), "rejected": str(rejected), "score": score}


def read_jsonl(patterns: list[str], resolve, field: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of the files matching `patterns`; errors name the file and line."""
    out = []
    for pattern in patterns:
        paths = sorted(glob.glob(str(resolve(pattern)), recursive=True))
        if not paths:
            raise FileNotFoundError(f"{field}: no file matches '{pattern}'")
        for path in paths:
            for n, row, error in iter_lines(path):
                if error:
                    raise ValueError(f"{field}: {path}:{n} is {error}")
                out.append((f"{path}:{n}", row))
    return out


def load_preferences(data, ctx, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference rows for a reward_model step's `data:` section."""
    if data.builtin == "preferences":
        train = builtin_pairs(ctx.seed, "train", data.n_per_task, data.tasks)
        held = builtin_pairs(ctx.seed, "eval", max(8, data.n_per_task // 4), data.tasks)
        return [normalize_pair(r, "builtin") for r in train], [normalize_pair(r, "builtin") for r in held]
    if data.step is not None:
        rows = read_jsonl([str(ctx.step(data.step).path("data") / "preferences.jsonl")], str, f"data.step {data.step}")
        eval_rows = []
    else:
        rows = read_jsonl(data.files, ctx.resolve_path, "data.files")
        eval_rows = read_jsonl(data.eval_files or [], ctx.resolve_path, "data.eval_files")
    pairs = [normalize_pair(r, where, tokenizer) for where, r in rows]
    held = [normalize_pair(r, where, tokenizer) for where, r in eval_rows]
    if not held:  # hold out a seeded fraction of the training rows
        random.Random(ctx.seed).shuffle(pairs)
        k = max(1, int(len(pairs) * data.eval_fraction))
        held, pairs = pairs[:k], pairs[k:]
    if not pairs:
        raise ValueError("data: no training preference pairs left after holding out the eval rows")
    return pairs, held


def normalize_messages_prompt(row: dict, where: str, tokenizer=None) -> dict:
    """A prompt row {prompt, ...}; chat `messages` (or a message-list prompt) rendered to text."""
    if "prompt" not in row and "messages" not in row:
        raise ValueError(f"{where}: prompt rows need 'prompt' (or chat 'messages'); got keys "
                         f"{', '.join(sorted(row)) or 'none'}")
    out = dict(row)
    messages = row["prompt"] if isinstance(row.get("prompt"), list) else row.get("messages")
    if messages is not None:
        if messages and messages[-1].get("role") == "assistant":  # a full chat: prompt with everything before
            messages = messages[:-1]
        out["prompt"] = render_messages(messages, tokenizer, generation_prompt=True)
    return out
