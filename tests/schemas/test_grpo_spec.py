"""specs/grpo.yaml compares grpo and ppo fairly: the quickstart's SFT model, one generated-token budget, one metric."""

from __future__ import annotations

from pathlib import Path

import schemas
from schemas.metrics import emits

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_grpo_and_ppo_start_from_the_quickstart_sft_at_one_budget():
    steps = schemas.load(SPECS / "grpo.yaml").spec.steps
    quickstart = schemas.load(SPECS / "quickstart.yaml").spec.steps
    for name in ("tokenizer", "base", "sft"):
        assert steps[name] == quickstart[name], f"{name} differs from the quickstart's"
    grpo, ppo = steps["grpo"], steps["ppo"]
    assert (grpo.kind, ppo.kind) == ("grpo", "ppo") and grpo.policy == ppo.policy == "sft"
    assert grpo.prompts == ppo.prompts and grpo.temperature == ppo.temperature and grpo.optimizer == ppo.optimizer
    assert grpo.iterations * grpo.prompts_per_iteration * grpo.group_size * grpo.max_new_tokens == \
        ppo.iterations * ppo.rollouts * ppo.max_new_tokens
    assert grpo.epochs * grpo.minibatches == ppo.epochs * ppo.minibatches  # optimizer steps per iteration
    assert grpo.true_reward_function() == ppo.true_reward_function() == "exact_match"
    for step in (grpo, ppo):
        assert {"val/true_reward", "before/val/true_reward"} <= set(emits(step, certain_only=True))
