"""The `reward_model` step: a scalar reward trained on preference pairs (Bradley-Terry; Ouyang et al. 2022).

Reads a model (usually the fine-tuned policy) and preference pairs; writes `model/`, a folder that
`AutoModelForSequenceClassification.from_pretrained` loads (tokenizer included, plus
`reward_stats.json` with the mean reward of reference responses, which `ppo` subtracts to centre its
rewards). Metrics: held-out pairwise accuracy, mean margin, reward mean/std.

With `data: {sheet: ...}` the data is a labelling sheet people filled in (components/lib/sheets.py):
rankings and ratings become pairs, or ratings train pointwise with the squared error to (rating - 3) / 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from components.lib import datasources
from components.lib.context import StepContext, StepOutput, effort
from components.lib.io import write_json_atomic
from components.lib.models import evaluating, save_pretrained
from components.lib.preferences import collate_points, encode_pairs, encode_points, load_preferences
from components.lib.packing import check_packable, pair_collate, real_tokens
from components.lib.rewards import STATS_FILE, batch_rewards, load_reward_model
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     total_steps, world_size)
from schemas.peft import PeftSpec
from schemas.steps.reward_model import RewardModelSpec


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor | None = None,
                       margin: float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """−[p·log σ(Δ − m) + (1 − p)·log σ(−(Δ − m))] + λ·mean((r_c + r_r)²), with Δ = r_c − r_r; p = 1 by default."""
    delta = r_chosen - r_rejected - margin
    loss = -F.logsigmoid(delta)
    if p is not None:
        loss = p * loss + (1 - p) * -F.logsigmoid(-delta)
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


class RewardModule(L.LightningModule):
    """Pairwise reward-model training: one forward over chosen and rejected together."""

    def __init__(self, model, optimizer: dict | None = None, schedule: dict | None = None, total_steps: int = 100,
                 margin: float = 0.0, center_coef: float = 0.0, soft_labels: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.tokens_in_batch = 0

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r_c, r_r = batch_rewards(self.model, batch).chunk(2)
        p = batch["score"].to(r_c.dtype) if self.hparams.soft_labels else None
        loss = bradley_terry_loss(r_c, r_r, p, self.hparams.margin, self.hparams.center_coef)
        return loss, r_c, r_r

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = real_tokens(batch)
        if "target" in batch:  # rated completions, pointwise (data.sheet.loss: mse)
            rewards = batch_rewards(self.model, batch)
            loss = F.mse_loss(rewards, batch["target"].to(rewards.dtype))
            self.log("train/loss", loss, prog_bar=True)
            return loss
        loss, r_c, r_r = self._step(batch)
        self.log_dict({"train/loss": loss, "train/accuracy": (r_c > r_r).float().mean()}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, r_c, r_r = self._step(batch)
        self.log_dict({"val/loss": loss, "val/accuracy": (r_c > r_r).float().mean(),
                       "val/margin": (r_c - r_r).mean()}, batch_size=len(r_c), sync_dist=True)  # over ranks

    def configure_optimizers(self):
        return configure_optimizer(self.model.named_parameters(), self.hparams.optimizer or {},
                                   self.hparams.schedule or {}, self.hparams.total_steps)


@torch.no_grad()
def evaluate_pairs(model, loader) -> dict[str, float]:
    """On held-out pairs: accuracy (ties count as wrong), mean margin, loss; rewards' mean and std, and the mean
    reward of the chosen replies (what `ppo` subtracts to centre its rewards)."""
    chosen, rejected = [], []
    with evaluating(model):
        for batch in loader:
            r_c, r_r = batch_rewards(model, batch).chunk(2)
            chosen.append(r_c)
            rejected.append(r_r)
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([r_c, r_r])
    return {"val/accuracy": float((r_c > r_r).float().mean()), "val/margin": float((r_c - r_r).mean()),
            "val/loss": float(bradley_terry_loss(r_c, r_r)), "reward/mean": float(both.mean()),
            "reward/std": float(both.std()), "reward/reference_mean": float(r_c.mean())}


def run(spec: RewardModelSpec, ctx: StepContext) -> StepOutput:
    """Load pairs and model, train with Lightning, measure on held-out pairs before and after, save and log."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    model, tokenizer = load_reward_model(ctx.model_source(spec.model), ctx.seed)
    data = spec.data
    train_rows, eval_rows, counts = load_data(spec, ctx, tokenizer)
    streamed = isinstance(train_rows, datasources.Draws)
    if streamed and (spec.epochs is not None or not (spec.max_steps or spec.max_tokens)):
        raise ValueError(f"data is streamed (a source's files total over {datasources.STREAM_ABOVE_MB} MB; "
                         "data.stream: auto) and a stream's pairs are never counted, so epochs cannot be: give "
                         "max_steps or max_tokens, or set data.stream: false")
    pointwise = data.sheet is not None and data.sheet.pointwise()
    encode = encode_points if pointwise else encode_pairs
    held = encode_pairs(eval_rows, tokenizer, data.max_length)
    collate = pair_collate(spec, tokenizer.pad_token_id)
    collate_train = (lambda rows: collate_points(rows, tokenizer.pad_token_id)) if pointwise else collate  # noqa: E731
    train_loader, train = datasources.training_loader(train_rows, lambda rows: encode(rows, tokenizer, data.max_length),
                                                      spec.batch_size, ctx.seed, collate_train)
    eval_loader = DataLoader(held, batch_size=spec.batch_size, collate_fn=collate)

    model = _apply_peft(model, spec.peft)
    if spec.packing_spec() is not None:
        if pointwise:
            raise ValueError("packing: rated completions trained pointwise (data.sheet.loss: mse) are not packed; "
                             "set packing: false")
        check_packable(model)
    per_step = spec.batch_size * spec.accumulate
    tokens_per_step = per_step * sum(map(_tokens, train)) // max(1, len(train))
    steps = total_steps(spec.loop(), tokens_per_step) if spec.epochs is None and (spec.max_steps or spec.max_tokens) \
        else max(1, math.ceil((spec.epochs or 1.0) * len(train) / per_step))
    module = RewardModule(model, spec.optimizer.model_dump(), spec.schedule.model_dump(), steps, spec.margin,
                          spec.center_coef, spec.soft_labels)
    before = evaluate_pairs(model, eval_loader)
    trainable, total = count_parameters(model)
    trainer = make_trainer(ctx, spec.loop(), steps, params=trainable)
    fit(trainer, module, ctx=ctx, train_dataloaders=train_loader, val_dataloaders=eval_loader)

    after = evaluate_pairs(model, eval_loader)
    ctx.log_metrics({k: v for k, v in after.items() if k.startswith("val/")}, step=trainer.global_step)
    pairs = datasources.trained_rows(train_rows, trainer.global_step, per_step * world_size())
    metrics = {**after, **{f"before/{k}": v for k, v in before.items() if k.startswith("val/")},
               **{k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "train/accuracy")},
               "train/steps": trainer.global_step, "params/trainable": trainable, "params/total": total,
               "data/train_ratings" if pointwise else "data/train_pairs": pairs, "data/eval_pairs": len(held),
               **counts, **datasources.mixture_metrics(train_rows, pairs), **perf_metrics(trainer)}
    if data.mixture:
        print(f"{ctx.name}: {datasources.describe_mixture(metrics, train_rows.sources)}", flush=True)
    folder = save_reward_model(model, tokenizer, ctx.out_dir / "model", metrics)
    _log(ctx, folder, eval_rows, model, eval_loader)
    print(f"{ctx.name}: held-out pairwise accuracy {before['val/accuracy']:.3f} -> {after['val/accuracy']:.3f}",
          flush=True)
    return StepOutput(outputs={"reward_model": "model", "tokenizer": "model"}, metrics=metrics,
                      info={"reference_mean": metrics["reward/reference_mean"], "reward_std": metrics["reward/std"],
                            "effort": effort(examples=pairs, of="ratings" if pointwise else "pairs")})


def load_data(spec: RewardModelSpec, ctx: StepContext, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(training rows, held-out pairs, the sheet's data/ counts): preference pairs, or a filled sheet's labels."""
    data = spec.data
    if data.sheet is None:
        step_data = lambda name: ctx.step(name).path("data")  # noqa: E731
        return (*load_preferences(data, ctx.seed, ctx.resolve_path, step_data, tokenizer), {})
    from components.lib.io import expand
    from components.lib.sheets import load_sheet

    sheet = data.sheet
    key = ctx.resolve_path(sheet.key) if sheet.key_file() else ctx.step(sheet.key).path("key")
    labels = load_sheet(expand(sheet.files, ctx.resolve_path, "data.sheet.files"), key, sheet.mode, ctx.seed,
                        data.eval_fraction, sheet.ties, sheet.loss, sheet.min_gap)
    if not labels.held:
        raise ValueError("data.sheet: no held-out pairs (the held-out prompts' labels all tie); label more prompts "
                         "or raise eval_fraction")
    return labels.train, labels.held, labels.counts


def _tokens(item: dict) -> int:
    """Tokens of one training item: a pair's two sequences, or a rated completion."""
    return len(item["ids"]) if "ids" in item else len(item["chosen"][0]) + len(item["rejected"][0])


def _apply_peft(model, spec: PeftSpec):
    """LoRA with the score head trained in full (peft's SEQ_CLS task), or full/bitfit training."""
    from components.lib.peft import apply_peft, peft_config

    if spec.method != "lora":
        model = apply_peft(model, spec)
        model.score.weight.requires_grad_(True)  # bitfit: the new head must still learn
        return model
    from peft import TaskType, get_peft_model

    config = peft_config(spec)
    config.task_type, config.lora_dropout = TaskType.SEQ_CLS, 0.0  # dropout off in reward models
    return get_peft_model(model, config)


def save_reward_model(model, tokenizer, folder: Path, metrics: dict) -> Path:
    """Save a plain transformers folder (LoRA merged), its tokenizer and the reward statistics."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    save_pretrained(model, tokenizer, folder)
    write_json_atomic(folder / STATS_FILE, {"reference_mean": metrics["reward/reference_mean"],
                                            "reward_std": metrics["reward/std"]})
    return folder


def _log(ctx: StepContext, folder: Path, rows: list[dict], model, loader) -> None:
    """Held-out pairs with their rewards as an MLflow table, and the model folder as an artifact."""
    if ctx.run_id is None:
        return
    with torch.no_grad():
        rewards = torch.cat([torch.stack(batch_rewards(model, b).chunk(2), 1)
                             for b in loader])
    table = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
              "r_chosen": float(x[0]), "r_rejected": float(x[1])} for r, x in zip(rows[:50], rewards[:50])]
    ctx.log_table(table, "eval_pairs.json")
    ctx.log_artifact(folder, "model")
