"""Verifiable rewards: Python functions registered by name, for `ppo.reward: {function: NAME}`.

A reward function takes `(prompt, completion, row)` and returns a float; `row` is the prompt's data
row (builtin task rows carry `answer`, JSONL rows whatever the file holds). Register your own with
`@reward("name")` in a module that `ppo.reward.module` imports.
"""

from __future__ import annotations

import importlib
from typing import Callable

RewardFn = Callable[[str, str, dict], float]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str, module: str | None = None) -> RewardFn:
    """The function registered as `name`, importing `module` first so it can register its own."""
    if module:
        importlib.import_module(module)
    if name not in REWARDS:
        from schemas.errors import did_you_mean

        raise KeyError(f"reward.function: no reward function named {name!r}{did_you_mean(name, REWARDS)}; "
                       f"registered: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


@reward("exact_match")
def exact_match(prompt: str, completion: str, row: dict) -> float:
    """1 when the completion's first line equals the row's `answer` (the task mixture's check), else 0."""
    from components.tasks import is_correct

    if "answer" not in row:
        raise KeyError("reward 'exact_match' needs an 'answer' field in each prompt row")
    return float(is_correct(row, completion))


@reward("contains_answer")
def contains_answer(prompt: str, completion: str, row: dict) -> float:
    """1 when the row's `answer` appears anywhere in the completion, else 0."""
    if "answer" not in row:
        raise KeyError("reward 'contains_answer' needs an 'answer' field in each prompt row")
    return float(str(row["answer"]).strip() in completion)


@reward("length_penalty")
def length_penalty(prompt: str, completion: str, row: dict) -> float:
    """−(characters / 100): a reward for brevity, to mix with others or to demonstrate reward hacking."""
    return -len(completion) / 100
