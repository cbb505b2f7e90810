"""The `reward_model` step: a scalar reward trained on preference pairs (Bradley-Terry; Ouyang et al. 2022).

Reads a model (usually the fine-tuned policy) and preference pairs; writes `model/`, a folder that
`AutoModelForSequenceClassification.from_pretrained` loads (tokenizer included, plus
`reward_stats.json` with the mean reward of reference responses, which `ppo` subtracts to centre its
rewards). Metrics: held-out pairwise accuracy, mean margin, reward mean/std.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from components.context import StepContext, StepOutput, write_json_atomic
from components.training import configure_optimizer, count_parameters, fit, make_trainer, total_steps
from schemas.base import OptimizerSpec, ScheduleSpec
from schemas.peft import PeftSpec
from schemas.steps.reward_model import RewardModelSpec

STATS_FILE = "reward_stats.json"


# -- the loss and the pooling ----------------------------------------------------------------------


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


def pooled_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token, for left or right padding."""
    width = attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head applied at every position: (batch, length). Used as reward and as critic values."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)).last_hidden_state
    return inner.score(hidden).squeeze(-1).float()


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One reward per sequence, read at its last attended token."""
    scores = token_scores(model, input_ids, attention_mask)
    return scores.gather(1, pooled_index(attention_mask)[:, None]).squeeze(1)


# -- model and data -------------------------------------------------------------------------------


def load_reward_model(source: str, seed: int = 0):
    """(model, tokenizer): a one-output classification head on `source`, with a pad distinct from EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl.trainer.utils import disable_dropout_in_model

    tokenizer = AutoTokenizer.from_pretrained(source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score weights newly initialized" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad == EOS the final EOS would count as padding and the reward would be read too early.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if not (Path(source) / STATS_FILE).is_file():  # a fresh head: N(0, 1/√(d+1)) as in Huang et al. 2024
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = model.score.weight
            w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1] + 1))
    disable_dropout_in_model(model)
    return model, tokenizer


def encode_pair(tokenizer, row: dict, max_length: int) -> dict:
    """Token ids of prompt+chosen and prompt+rejected, each ending in EOS; the prompt is cut from the left."""
    prompt = tokenizer(row["prompt"])["input_ids"] if row["prompt"] else []
    out = {"score": row.get("score", 1.0)}
    for key in ("chosen", "rejected"):
        response = tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response = response[:max_length]
        out[key] = prompt[max(0, len(prompt) - (max_length - len(response))):] + response
    return out


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """Right-pad chosen then rejected sequences into one (2B, L) batch."""
    from trl.trainer.utils import pad

    seqs = [torch.tensor(r["chosen"]) for r in rows] + [torch.tensor(r["rejected"]) for r in rows]
    ids = pad(seqs, padding_value=pad_id)
    mask = pad([torch.ones_like(s) for s in seqs], padding_value=0)
    return {"input_ids": ids, "attention_mask": mask, "score": torch.tensor([r["score"] for r in rows])}


# -- Lightning module -----------------------------------------------------------------------------


class RewardModule(L.LightningModule):
    """Pairwise reward-model training: one forward over chosen and rejected together."""

    def __init__(self, model, optimizer: OptimizerSpec = OptimizerSpec(), schedule: ScheduleSpec = ScheduleSpec(),
                 steps: int = 100, margin: float = 0.0, center_coef: float = 0.0, soft_labels: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.tokens_in_batch = 0

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rewards = sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"])
        r_c, r_r = rewards.chunk(2)
        p = batch["score"].to(r_c.dtype) if self.hparams.soft_labels else None
        loss = bradley_terry_loss(r_c, r_r, p, self.hparams.margin, self.hparams.center_coef)
        return loss, r_c, r_r

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, r_c, r_r = self._step(batch)
        self.tokens_in_batch = int(batch["attention_mask"].sum())
        self.log_dict({"train/loss": loss, "train/accuracy": (r_c > r_r).float().mean()}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, r_c, r_r = self._step(batch)
        self.log_dict({"val/loss": loss, "val/accuracy": (r_c > r_r).float().mean(),
                       "val/margin": (r_c - r_r).mean()}, batch_size=len(r_c))

    def configure_optimizers(self):
        return configure_optimizer(self.model.named_parameters(), self.hparams.optimizer, self.hparams.schedule,
                                   self.hparams.steps)


@torch.no_grad()
def evaluate_pairs(model, loader) -> dict[str, float]:
    """Held-out accuracy (ties count as wrong), mean margin, reward mean/std, mean reward of chosen responses."""
    model.eval()
    chosen, rejected = [], []
    for batch in loader:
        r = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        r_c, r_r = r.chunk(2)
        chosen.append(r_c)
        rejected.append(r_r)
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([r_c, r_r])
    return {"eval/accuracy": float((r_c > r_r).float().mean()), "eval/margin": float((r_c - r_r).mean()),
            "reward/mean": float(both.mean()), "reward/std": float(both.std()),
            "reward/reference_mean": float(r_c.mean()), "eval/loss": float(bradley_terry_loss(r_c, r_r))}


# -- the step -------------------------------------------------------------------------------------


def run(spec: RewardModelSpec, ctx: StepContext) -> StepOutput:
    """Load pairs and model, train with Lightning, measure on held-out pairs, save and log."""
    from components.preferences import load_preferences

    L.seed_everything(ctx.seed, workers=True, verbose=False)
    model, tokenizer = load_reward_model(ctx.model_source(spec.model), ctx.seed)
    train_rows, eval_rows = load_preferences(spec.data, ctx, tokenizer)
    train = [encode_pair(tokenizer, r, spec.data.max_length) for r in train_rows]
    held = [encode_pair(tokenizer, r, spec.data.max_length) for r in eval_rows]
    collate = lambda rows: collate_pairs(rows, tokenizer.pad_token_id)  # noqa: E731
    gen = torch.Generator().manual_seed(ctx.seed)
    train_loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=gen, collate_fn=collate)
    eval_loader = DataLoader(held, batch_size=spec.batch_size, collate_fn=collate)

    model = _apply_peft(model, spec.peft)
    per_step = spec.batch_size * spec.accumulate
    tokens_per_step = per_step * 2 * sum(len(r["chosen"]) + len(r["rejected"]) for r in train) // (2 * len(train))
    steps = total_steps(spec, tokens_per_step) if spec.epochs is None and (spec.max_steps or spec.max_tokens) \
        else max(1, math.ceil((spec.epochs or 1.0) * len(train) / per_step))
    module = RewardModule(model, spec.optimizer, spec.schedule, steps, spec.margin, spec.center_coef,
                          spec.soft_labels)
    initial = evaluate_pairs(model, eval_loader)
    trainer = make_trainer(ctx, spec, steps, params=count_parameters(model)[0])
    fit(trainer, module, ctx=ctx, train_dataloaders=train_loader, val_dataloaders=eval_loader)

    metrics = evaluate_pairs(model, eval_loader)
    metrics["eval/initial_accuracy"] = initial["eval/accuracy"]
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "perf/"))})
    folder = save_reward_model(model, tokenizer, ctx.out_dir / "model", metrics)
    _log(ctx, folder, eval_rows, model, eval_loader)
    return StepOutput(outputs={"model": "model", "reward_model": "model", "tokenizer": "model"},
                      metrics=metrics, info={"reference_mean": metrics["reward/reference_mean"],
                                             "reward_std": metrics["reward/std"]})


def _apply_peft(model, spec: PeftSpec):
    """LoRA with the score head trained in full (peft's SEQ_CLS task), or full/bitfit training."""
    from components.peft_methods import apply_peft, peft_config

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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_json_atomic(folder / STATS_FILE, {"reference_mean": metrics["reward/reference_mean"],
                                            "reward_std": metrics["reward/std"]})
    return folder


def read_reward_stats(folder: str | Path) -> dict:
    """The statistics a reward_model step saved beside its weights ({} for foreign folders)."""
    path = Path(folder) / STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _log(ctx: StepContext, folder: Path, rows: list[dict], model, loader) -> None:
    """Held-out pairs with their rewards as an MLflow table, and the model folder as an artifact."""
    if ctx.run_id is None:
        return
    with torch.no_grad():
        rewards = torch.cat([torch.stack(sequence_rewards(model, b["input_ids"], b["attention_mask"]).chunk(2), 1)
                             for b in loader])
    table = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
              "r_chosen": float(x[0]), "r_rejected": float(x[1])} for r, x in zip(rows[:50], rewards[:50])]
    ctx.log_table(table, "eval_pairs.json")
    ctx.log_artifact(folder, "model")
