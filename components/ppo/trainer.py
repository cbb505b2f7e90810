"""PPO's progress lines, saving the final policy, and logging the held-out comparison."""

from __future__ import annotations

import time
import warnings

from lightning.pytorch.callbacks import Callback

from components.lib.context import StepContext
from components.lib.models import save_pretrained
from schemas.steps.ppo import PPOSpec

# checkpoints hold the state after the iteration's updates, which is what resuming needs
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class IterationProgress(Callback):
    """One line per few iterations: reward, true reward, KL (for logs and CI)."""

    def __init__(self, name: str, iterations: int):
        self.name, self.iterations, self.every = name, iterations, max(1, iterations // 10)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        done = len(module.history)
        if trainer.is_global_zero and (done % self.every == 0 or done == self.iterations):
            m = module.history[-1]
            shown = " ".join(f"{k.split('/')[-1]}={m[k]:.3g}" for k in
                             ("reward/mean", "reward/true_reward", "ppo/kl", "ppo/entropy") if k in m)
            print(f"{self.name}: iteration {done}/{self.iterations} {shown} "
                  f"({time.perf_counter() - self.start:.0f}s)", flush=True)


def save_policy(module, tokenizer, ctx: StepContext, spec: PPOSpec) -> dict[str, str]:
    """The final policy as a transformers folder (plus the adapter with LoRA), tokenizer included."""
    if spec.peft.method == "lora":
        from components.lib.peft import save_outputs

        return save_outputs(module.policy, tokenizer, ctx.out_dir, merge=True)
    save_pretrained(module.policy, tokenizer, ctx.out_dir / "model")
    return {"model": "model", "tokenizer": "model"}


def log_results(ctx: StepContext, spec: PPOSpec, module, rows: list[dict], initial: list[str], final: list[str],
                outputs: dict[str, str]) -> None:
    """Sample completions (initial vs final) as a table, the iteration curve, the model in MLflow."""
    if ctx.run_id is None:
        return
    from components.lib.mlflow_models import log_transformers_model

    table = [{"prompt": r["prompt"], "initial": a, "final": b, **({"answer": r["answer"]} if "answer" in r else {})}
             for r, a, b in zip(rows[:spec.eval_samples], initial, final)]
    if table:
        ctx.log_table(table, "samples.json")
    ctx.log_table([{"iteration": i + 1, **m} for i, m in enumerate(module.history)], "curve.json")
    log_transformers_model(ctx, ctx.out_dir / outputs["model"])
    if "adapter" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["adapter"], "adapter")
