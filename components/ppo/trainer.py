"""PPO's progress lines, saving the final policy, and logging the held-out comparison (components/lib/policy.py)."""

from __future__ import annotations

from components.lib.context import StepContext
from components.lib.policy import IterationProgress as _Progress, log_policy_results, save_policy as _save
from schemas.steps.ppo import PPOSpec

SHOWN = ("reward/mean", "reward/true_reward", "ppo/kl", "ppo/entropy")


class IterationProgress(_Progress):
    """One line per few iterations: reward, true reward, KL (for logs and CI)."""

    def __init__(self, name: str, iterations: int):
        super().__init__(name, iterations, SHOWN)


def save_policy(module, tokenizer, ctx: StepContext, spec: PPOSpec) -> dict[str, str]:
    """The final policy as a transformers folder (plus the adapter with LoRA), tokenizer included."""
    return _save(module.policy, tokenizer, ctx, spec.peft.method == "lora")


def log_results(ctx: StepContext, spec: PPOSpec, module, rows: list[dict], initial: list[str], final: list[str],
                outputs: dict[str, str]) -> None:
    """Sample completions (initial vs final) as a table, the iteration curve, the model in MLflow."""
    log_policy_results(ctx, module.history, rows, initial, final, outputs, spec.eval_samples)
