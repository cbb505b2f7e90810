"""`collect`: write a labelling sheet of a policy's completions for people to rank or rate."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..base import CausalModelRef, StepSpec
from ..data import PromptDataSpec

MAX_COMPLETIONS = 26  # labels A..Z


class CollectSpec(StepSpec):
    """k sampled completions per prompt, shuffled and anonymised, as a sheet a person fills in (README, collect).

    The sheet (`sheet.csv` and `sheet.jsonl`, one row per completion) shows the prompt, an id such as
    `p007-B` and the completion; the key (`key.jsonl`) maps each id to its draw and the exact texts, and is
    not for the labeller. A `reward_model` step reads the filled sheet with `data: {sheet: {files, key}}`.
    """

    produces: ClassVar[frozenset[str]] = frozenset({"sheet", "key"})

    kind: Literal["collect"]
    policy: CausalModelRef
    """The model whose completions are labelled (usually the policy a reward model is meant for)."""
    prompts: PromptDataSpec
    """The prompts, as ppo and grpo take them; every file row is labelled (eval_files too), builtin: the
    training prompts, so the held-out task keys stay unseen."""
    max_prompts: int | None = Field(None, ge=1)
    """Label at most this many prompts, a seeded sample of them (null: all)."""
    completions: int = Field(4, ge=2, le=MAX_COMPLETIONS)
    """k: completions sampled per prompt (InstructGPT ranked 4 to 9); labelled A, B, C, ... in shuffled order."""
    distinct: bool = True
    """Leave out a completion equal to an earlier one of its prompt (up to whitespace): labelling it twice spends
    the budget on a tie. A prompt left with fewer than 2 completions is left out."""
    mode: Literal["rank", "rate"] = "rank"
    """`rank`: the labeller writes a rank per completion (1 = best, equal ranks for a tie), giving k(k-1)/2
    comparisons per prompt; `rate`: a rating from 1 (worst) to 5 (best) per completion."""
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature (no top-k or top-p: the completions are the policy's own distribution, as ppo
    and grpo sample it)."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Longest completion, in tokens; a completion ends at its first EOS."""

    def plan_details(self) -> dict:
        return {"completions per prompt": self.completions, "mode": self.mode}
