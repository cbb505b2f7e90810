"""The Lightning Trainer for PPO, saving the final policy, and logging the held-out comparison."""

from __future__ import annotations

import time
import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from components.context import StepContext
from components.training import CheckpointOnStop, StepLogger, resolve_precision
from schemas.steps.ppo import PPOSpec


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


def make_ppo_trainer(ctx: StepContext, spec: PPOSpec) -> L.Trainer:
    """A Trainer whose global step counts optimizer steps (iterations × epochs × minibatches)."""
    per_iteration = spec.epochs * spec.minibatches
    # checkpoints hold the state after the iteration's updates, which is what resuming needs
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    ctx.ckpt_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [ModelCheckpoint(dirpath=ctx.ckpt_dir, filename="step-{step}", save_top_k=1, monitor="step",
                                 mode="max", save_last=True,
                                 every_n_train_steps=min(spec.checkpoint_every, spec.iterations) * per_iteration),
                 IterationProgress(ctx.name, spec.iterations), CheckpointOnStop(ctx.ckpt_dir)]
    logger = StepLogger(run_id=ctx.run_id, tracking_uri=ctx.tracking_uri) if ctx.run_id else False
    t = ctx.trainer
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
                     precision=resolve_precision(t.precision, t.accelerator), max_steps=spec.iterations * per_iteration,
                     max_epochs=-1, logger=logger, callbacks=callbacks, enable_progress_bar=False,
                     enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=str(ctx.ckpt_dir), benchmark=False)


def save_policy(module, tokenizer, ctx: StepContext, spec: PPOSpec) -> dict[str, str]:
    """The final policy as a transformers folder (plus the adapter with LoRA), tokenizer included."""
    if spec.peft.method == "lora":
        from components.peft_methods import save_outputs

        return save_outputs(module.policy, tokenizer, ctx.out_dir, merge=True)
    module.policy.save_pretrained(ctx.out_dir / "model")
    tokenizer.save_pretrained(ctx.out_dir / "model")
    return {"model": "model", "tokenizer": "model"}


def log_results(ctx: StepContext, spec: PPOSpec, module, rows: list[dict], initial: list[str], final: list[str],
                outputs: dict[str, str]) -> None:
    """Sample completions (initial vs final) as a table, the iteration curve, the model in MLflow."""
    if ctx.run_id is None:
        return
    from components.mlflow_models import log_transformers_model

    table = [{"prompt": r["prompt"], "initial": a, "final": b, **({"answer": r["answer"]} if "answer" in r else {})}
             for r, a, b in zip(rows[:spec.eval_samples], initial, final)]
    if table:
        ctx.log_table(table, "samples.json")
    ctx.log_table([{"iteration": i + 1, **m} for i, m in enumerate(module.history)], "curve.json")
    log_transformers_model(ctx, ctx.out_dir / outputs["model"])
    if "adapter" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["adapter"], "adapter")
