"""Critique/revision transcripts in the CAI format, the published dataset shape, and its disjoint splits.

Pure text and bookkeeping, no models: the shapes the tests check (uniform principles, SFT targets free
of critique text, disjoint halves) live here.
"""

from __future__ import annotations

import random

from schemas.constitution import Constitution, Principle, Transcript

CRITIQUE_CUE, REVISION_CUE = "Critique:", "Revision:"


def draw_principles(rng: random.Random, principles: list[Principle], rounds: int) -> list[Principle]:
    """One principle per round, each drawn uniformly at random (with replacement, as in the paper)."""
    return [rng.choice(principles) for _ in range(rounds)]


def human_turn(prompt: str) -> str:
    return f"Human: {prompt}\n\nAssistant:"


def critique_request(principle: Principle) -> str:
    return f"\n\nCritique request: {principle.critique}\n\n{CRITIQUE_CUE}"


def revision_request(principle: Principle) -> str:
    return f"\n\nRevision request: {principle.revision}\n\n{REVISION_CUE}"


def example_text(example: Transcript, constitution: Constitution) -> str:
    """A few-shot transcript, rendered exactly like the contexts the model continues."""
    text = human_turn(example.prompt) + " " + example.response
    for r in example.rounds:
        p = constitution.principle(r.principle)
        text += critique_request(p) + " " + r.critique + revision_request(p) + " " + r.revision
    return text + "\n\n"


def few_shot_prefix(constitution: Constitution, k: int) -> str:
    """The first k example transcripts of the constitution, separated by blank lines."""
    return "".join(example_text(e, constitution) for e in constitution.examples[:k])


def clean(text: str) -> str:
    """A generated turn ends at the first blank line or the next speaker's cue."""
    for stop in ("\n\n", "Human:", "Critique request:", "Revision request:"):
        text = text.split(stop, 1)[0]
    return text.strip()


def published_row(prompt: str, init_response: str, rounds: list[dict]) -> dict:
    """The column shape peers publish (HF cai-conversation-harmless): the last round fills critic_*/revision_*,
    every round is kept under `rounds`."""
    last = rounds[-1]
    return {"init_prompt": prompt, "init_response": init_response,
            "critic_prompt": last["critic_prompt"], "critic_response": last["critic_response"],
            "revision_prompt": last["revision_prompt"], "revision_response": last["revision_response"],
            "prompt": prompt, "principles": [r["principle"] for r in rounds], "rounds": rounds}


def split_halves(rows: list[dict], sft_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint SFT and preference halves, split by prompt with a seeded shuffle."""
    order = list(range(len(rows)))
    random.Random(f"{seed}|cai-split").shuffle(order)
    k = min(len(rows) - 1, max(1, round(len(rows) * sft_fraction)))
    return [rows[i] for i in sorted(order[:k])], [rows[i] for i in sorted(order[k:])]


def sft_row(row: dict, policy_prompt: str) -> dict:
    """Prompt -> final revision only: no critique request, critique or revision request in the target."""
    revision = row["revision_response"]
    return {"prompt": policy_prompt, "completion": " " + revision,
            "messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": revision}]}


def revision_pair(row: dict) -> dict:
    """The handbook's preference form: the final revision chosen over the initial reply."""
    user = {"role": "user", "content": row["prompt"]}
    return {"prompt": row["prompt"], "chosen": [user, {"role": "assistant", "content": row["revision_response"]}],
            "rejected": [user, {"role": "assistant", "content": row["init_response"]}]}
