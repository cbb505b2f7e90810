"""The policy side of the RL kinds (ppo, grpo): policy and prompts in, held-out comparison, progress, outputs.

A module these functions drive has `rollout(rows, greedy=False) -> (Rollout, extras)` with `scores` set and
`extras["kl"]` per token (and `model_score`, `true_reward` per sequence where it has them), a `tokenizer`,
a `policy`, and a `history` of per-iteration metrics.
"""

from __future__ import annotations

import time
import warnings

import torch
from lightning.pytorch.callbacks import Callback

from components.lib.context import StepContext
from components.lib.models import evaluating, load_model, save_pretrained
from schemas.data import PromptDataSpec

SAMPLE_BATCH = 64  # held-out prompts generated per batch

# checkpoints hold the state after the iteration's updates, which is what resuming needs
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def load_policy(source: str):
    """(policy, tokenizer) with dropout off (masks, not pad ids, decide what counts in the losses)."""
    from trl.trainer.utils import disable_dropout_in_model

    policy, tokenizer = load_model(source)
    disable_dropout_in_model(policy)
    return policy, tokenizer


def load_prompts(data: PromptDataSpec, batch: int, ctx: StepContext, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt rows, the train rows filling at least one `batch`; builtin rows carry the task's
    answer for verifiable rewards."""
    from components.lib.io import read_jsonl_files, split_rows
    from components.lib.preferences import prompt_row

    if data.builtin == "tasks":
        from components.lib.tasks import make_examples

        rows = make_examples(ctx.seed, "train", data.n_per_task, data.tasks)
        held = make_examples(ctx.seed, "eval", max(4, data.n_per_task // 4), data.tasks)
        return fill_rows(rows, batch), held
    rows = read_jsonl_files(data.files, ctx.resolve_path, "prompts.files")
    held = read_jsonl_files(data.eval_files or [], ctx.resolve_path, "prompts.eval_files")
    if not held:
        rows, held = split_rows(rows, data.eval_fraction, ctx.seed)
    rows, held = [prompt_row(r, tokenizer) for r in rows], [prompt_row(r, tokenizer) for r in held]
    return fill_rows(rows, batch), held


def fill_rows(rows: list[dict], batch: int) -> list[dict]:
    """Repeat a short prompt list so that it fills at least one batch (on every rank)."""
    return rows * -(-batch // len(rows)) if 0 < len(rows) < batch else rows


@torch.no_grad()
def evaluate_policy(module, rows: list[dict], seed: int, greedy: bool = False) -> tuple[dict, list[str]]:
    """Mean score, model score, true reward, summed KL and length on held-out prompts; also the completions."""
    sums: dict[str, float] = {}
    texts: list[str] = []
    with evaluating(module), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(rows), SAMPLE_BATCH):
            part = rows[i:i + SAMPLE_BATCH]
            roll, extras = module.rollout(part, greedy=greedy)
            values = {"score": roll.scores, "kl": extras["kl"].sum(1), "length": roll.valid.sum(1).float()}
            values.update({k: extras[k] for k in ("model_score", "true_reward") if k in extras})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(torch.nan_to_num(v).sum())
            texts += module.tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
    return {k: v / len(rows) for k, v in sums.items()}, texts


def held_out(module, rows: list[dict], seed: int) -> tuple[dict[str, float], list[str]]:
    """`val/*` on the held-out prompts: sampled score, model score, true reward, KL, length; greedy too."""
    sampled, texts = evaluate_policy(module, rows, seed)
    greedy, _ = evaluate_policy(module, rows, seed, greedy=True)
    metrics = {f"val/{k}": v for k, v in sampled.items()}
    metrics.update({f"val/{k}_greedy": v for k, v in greedy.items() if k in ("true_reward", "model_score")})
    return metrics, texts


class IterationProgress(Callback):
    """One line per few iterations with the `shown` metrics of the latest one (for logs and CI)."""

    def __init__(self, name: str, iterations: int, shown: tuple[str, ...]):
        self.name, self.iterations, self.every = name, iterations, max(1, iterations // 10)
        self.shown = shown
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        done = len(module.history)
        if trainer.is_global_zero and (done % self.every == 0 or done == self.iterations):
            m = module.history[-1]
            shown = " ".join(f"{k.split('/')[-1]}={m[k]:.3g}" for k in self.shown if k in m)
            print(f"{self.name}: iteration {done}/{self.iterations} {shown} "
                  f"({time.perf_counter() - self.start:.0f}s)", flush=True)


def save_policy(policy, tokenizer, ctx: StepContext, lora: bool) -> dict[str, str]:
    """The final policy as a transformers folder (plus the adapter, merged into `model/`, with LoRA)."""
    if lora:
        from components.lib.peft import save_outputs

        return save_outputs(policy, tokenizer, ctx.out_dir, merge=True)
    save_pretrained(policy, tokenizer, ctx.out_dir / "model")
    return {"model": "model", "tokenizer": "model"}


def log_policy_results(ctx: StepContext, history: list[dict], rows: list[dict], initial: list[str],
                       final: list[str], outputs: dict[str, str], samples: int) -> None:
    """Sample completions (initial vs final) as a table, the iteration curve, the model in MLflow."""
    if ctx.run_id is None:
        return
    from components.lib.mlflow_models import log_transformers_model

    table = [{"prompt": r["prompt"], "initial": a, "final": b, **({"answer": r["answer"]} if "answer" in r else {})}
             for r, a, b in zip(rows[:samples], initial, final)]
    if table:
        ctx.log_table(table, "samples.json")
    ctx.log_table([{"iteration": i + 1, **m} for i, m in enumerate(history)], "curve.json")
    log_transformers_model(ctx, ctx.out_dir / outputs["model"])
    if "adapter" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["adapter"], "adapter")
