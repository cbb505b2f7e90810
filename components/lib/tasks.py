"""The builtin task mixture: templated tasks with verifiable answers, deterministic by seed.

A FLAN-style mixture (Wei et al. 2022) in miniature. Every example is built from a *key* (a word
tuple, a pair of numbers, a lexicon combination); a seeded hash of the key decides whether it is
held out, so an eval example never appears in training. Most tasks hold out *combinations* of parts
the model sees in training (sentiment of an unseen noun/adjective pair, copying an unseen word
tuple), so held-out accuracy measures generalization. `add` is a lookup task (100 operand pairs, ~20
held out): a small model memorizes the training pairs and stays near chance on the held-out ones, and
per-task accuracy reports that honestly (`TASK_STYLE`).

Rows are `{"task", "prompt", "completion", "answer"}`. The prompt ends with "Answer:"; the completion
is " <answer>\\n". Training appends the tokenizer's EOS after the completion (as TRL does), and
generation stops at EOS or the first newline; `evaluation.exact_match` compares the first generated line with the
answer after trimming and collapsing spaces (case-sensitive: `capitalize` depends on case).
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

HELD_OUT_PERCENT = 20  # share of each task's key space reserved for evaluation

WORDS = ["cat", "dog", "red", "blue", "tree", "house", "sun", "moon", "book", "fish", "bird", "car",
         "green", "water", "stone", "road", "king", "milk", "star", "door", "apple", "river", "hat", "box",
         "cloud", "lamp", "bread", "ship", "rain", "gold"]
NOUNS = ["soup", "movie", "book", "hotel", "car", "phone", "song", "game", "room", "service", "pizza",
         "coffee", "camera", "garden", "lesson", "show", "bike", "chair", "laptop", "shirt"]
POSITIVE = ["great", "good", "excellent", "lovely", "wonderful", "nice", "perfect", "amazing", "pleasant",
            "fantastic"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible", "boring", "broken", "dirty", "ugly", "slow"]
POLITE = ["please", "could you kindly", "would you please", "thank you, could you", "if you can, please",
          "sorry to ask, but please"]
RUDE = ["just", "hurry up and", "stop wasting time and", "do it now and", "I told you to", "shut up and"]
REQUESTS = ["send the report", "close the door", "check the file", "call me back", "fix the bug",
            "update the page", "read the book", "clean the room", "answer the mail", "open the window",
            "print the list", "save the data"]


def _words(rng: random.Random, low: int = 2, high: int = 4) -> tuple[str, ...]:
    return tuple(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _larger_key(rng: random.Random) -> tuple[int, int]:
    a, b = rng.sample(range(10, 100), 2)
    return a, b


def _polite(key: tuple, rng: random.Random) -> tuple[str, str]:
    polite_opener, rude_opener, request = key
    good, bad = f"{polite_opener} {request}.", f"{rude_opener} {request}."
    if rng.random() < 0.5:
        return f"Which reply is polite? (A) {good} (B) {bad}", "A"
    return f"Which reply is polite? (A) {bad} (B) {good}", "B"


def _sentiment(key: tuple, rng: random.Random) -> tuple[str, str]:
    noun, adjective = key
    return f"Review: the {noun} was {adjective}.", "positive" if adjective in POSITIVE else "negative"


# name -> (key space, draw a key, render (key, rng) -> (question, answer))
_TASKS: dict[str, tuple[str, Callable, Callable]] = {
    "copy": ("words", _words, lambda k, r: ("Copy: " + " ".join(k), " ".join(k))),
    "reverse": ("words", _words, lambda k, r: ("Reverse: " + " ".join(k), " ".join(reversed(k)))),
    "capitalize": ("words", _words, lambda k, r: ("Capitalize: " + " ".join(k), " ".join(w.title() for w in k))),
    "count": ("words", lambda r: _words(r, 1, 6), lambda k, r: ("Count: " + " ".join(k), str(len(k)))),
    "larger": ("pairs", _larger_key, lambda k, r: (f"Larger: {k[0]} or {k[1]}", str(max(k)))),
    "add": ("digits", lambda r: (r.randint(0, 9), r.randint(0, 9)), lambda k, r: (f"Add: {k[0]} + {k[1]}",
                                                                                  str(k[0] + k[1]))),
    "sentiment": ("reviews", lambda r: (r.choice(NOUNS), r.choice(POSITIVE + NEGATIVE)), _sentiment),
    "polite": ("manners", lambda r: (r.choice(POLITE), r.choice(RUDE), r.choice(REQUESTS)), _polite),
}
TASKS: list[str] = list(_TASKS)
TASK_STYLE = {name: "lookup" if name == "add" else "compositional" for name in TASKS}
"""`compositional`: held-out keys are new combinations of seen parts; `lookup`: each key is a fact."""


def held_out(seed: int, space: str, key: tuple) -> bool:
    """Tell whether a key belongs to the eval split (a seeded hash, shared by tasks over one key space)."""
    digest = hashlib.sha256(f"{seed}|{space}|{key!r}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELD_OUT_PERCENT


def make_examples(seed: int, split: str, n_per_task: int, tasks: list[str] | None = None) -> list[dict]:
    """Rows of the mixture for `split` ("train" or "eval"), `n_per_task` per task, shuffled.

    Train rows may repeat a key (small key spaces); eval rows are distinct keys, so a task whose
    held-out space is smaller than n_per_task (`add`: ~20 pairs) yields fewer rows.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = list(tasks or TASKS)
    unknown = [t for t in names if t not in _TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; expected some of: {', '.join(TASKS)}")
    rows: list[dict] = []
    for name in names:
        rows += _task_rows(seed, split, n_per_task, name)
    random.Random(f"{seed}|{split}|shuffle").shuffle(rows)
    return rows


def _task_rows(seed: int, split: str, n: int, name: str) -> list[dict]:
    space, draw, render = _TASKS[name]
    rng = random.Random(f"{seed}|{split}|{name}")
    want_eval, seen, rows = split == "eval", set(), []
    for _ in range(200 * n):
        if len(rows) == n:
            break
        key = draw(rng)
        if held_out(seed, space, key) != want_eval or (want_eval and key in seen):
            continue
        seen.add(key)
        question, answer = render(key, rng)
        rows.append({"task": name, "prompt": f"{question}\nAnswer:", "completion": f" {answer}\n",
                     "answer": answer})
    return rows


def polite_requests(seed: int, n: int) -> list[dict]:
    """Held-out `polite` combinations as requests to word, each with its reference polite/rude reply.

    For RLAIF demos: a judge fine-tuned on the `polite` task never saw these combinations, so its labels
    on them measure what it learned, and the reference pair is the ground truth they are scored against.
    """
    rng = random.Random(f"{seed}|eval|polite-requests")
    rows, seen = [], set()
    for _ in range(200 * n):
        if len(rows) == n:
            break
        key = (rng.choice(POLITE), rng.choice(RUDE), rng.choice(REQUESTS))
        if not held_out(seed, "manners", key) or key in seen:
            continue
        seen.add(key)
        polite_opener, rude_opener, request = key
        rows.append({"prompt": f"Ask someone to {request}.", "chosen": f"{polite_opener} {request}.",
                     "rejected": f"{rude_opener} {request}.", "principle": "polite"})
    return rows


def reviews(seed: int, split: str, n: int) -> list[dict]:
    """Distinct reviews of the `sentiment` task as {"text", "label"} rows, `n` at most, of one split ("train"
    or "eval", the task's own seeded hold-out): a held-out review is a noun/adjective pair no training review has."""
    space, _, render = _TASKS["sentiment"]
    keys = [(noun, adjective) for noun in NOUNS for adjective in POSITIVE + NEGATIVE
            if held_out(seed, space, (noun, adjective)) == (split == "eval")]
    random.Random(f"{seed}|{split}|reviews").shuffle(keys)
    return [{"text": text, "label": label} for text, label in (render(key, None) for key in keys[:n])]
