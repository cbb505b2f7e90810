"""`dpo`: direct preference optimisation of a causal LM against a frozen reference.

Reads: a model (`model:`), optionally a separate `reference:`, and preference pairs (JSONL files, the
builtin task pairs, or a step's `data/preferences.jsonl`, e.g. a `constitutional` step's AI labels).
Writes: `model/` (merged standalone transformers folder) and, for adapter methods, `adapter/`.
Logs: train/val loss, implicit rewards of chosen and rejected replies, reward accuracy and margin, and
how often the policy itself prefers the chosen reply on held-out pairs before and after training.
Paper: Rafailov et al. 2023, "Direct Preference Optimization"; soft labels (a row's `score`) weigh
the two orderings as in conservative DPO (Mitchell 2023), which TRL 1.16's sigmoid loss does not offer.

TRL 1.16 computes the DPO loss inline in `DPOTrainer._compute_loss`, which needs a trainer instance
(accelerator, dataset, fused LM head); it offers no function a LightningModule can call. The sigmoid
loss is therefore written here (`dpo_loss`, a few lines), and a test checks it against a real
`DPOTrainer` on the same batch.
"""

from __future__ import annotations

import copy
import random

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from components.lib import datasources
from components.lib.context import StepContext, StepOutput, effort
from components.lib.mlflow_models import log_outputs
from components.lib.models import evaluating, load_model
from components.lib.peft import apply_peft, save_outputs
from components.lib.packing import check_packable, pair_collate, per_sequence_sum, real_tokens
from components.lib.preferences import encode_pairs, load_preferences
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     total_steps, world_size)
from schemas.steps.dpo import DpoSpec


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, score: torch.Tensor | None = None):
    """Per-pair sigmoid DPO loss with soft labels; also the implicit rewards β·log(π/π_ref).

    loss = -[s·logσ(β·Δ) + (1-s)·logσ(-β·Δ)], Δ = (log π_c - log π_ref,c) - (log π_r - log π_ref,r).
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards
    s = torch.ones_like(logits) if score is None else score.to(logits.dtype)
    loss = -(s * F.logsigmoid(logits) + (1 - s) * F.logsigmoid(-logits))
    return loss, chosen_rewards, rejected_rewards


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's completion tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -input_ids.shape[1]:-1]  # prompt tuning prepends virtual tokens; keep the real ones
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def batch_logps(model, batch: dict) -> torch.Tensor:
    """`completion_logps` of each sequence of a padded batch, or of a packed one (components/lib/packing.py:
    the per-token log-probs summed per sequence; the first token of each sequence is never a completion token)."""
    if "sequence_index" not in batch:
        return completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ids = batch["input_ids"]
    logits = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits[:, :-1]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    return per_sequence_sum(token_logps * batch["completion_mask"][:, 1:], batch["sequence_index"][:, 1:],
                            len(batch["last_index"]))


class DpoModule(L.LightningModule):
    """The policy under DPO; the reference is a frozen model, or the policy with its adapter disabled."""

    def __init__(self, policy, reference=None, beta: float = 0.1, soft_labels: bool = True,
                 optimizer: dict | None = None, schedule: dict | None = None, total_steps: int = 100):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "reference"])
        self.policy = policy
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.tokens_in_batch = 0

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """Log-probs under the frozen reference (no gradient)."""
        with torch.no_grad():
            if self.reference is not None:
                return batch_logps(self.reference, batch)
            with self.policy.disable_adapter():
                return batch_logps(self.policy, batch)

    def pair_stats(self, batch: dict) -> dict:
        logps = batch_logps(self.policy, batch)
        ref = self.reference_logps(batch)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        score = batch["score"] if self.hparams.soft_labels else None
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, self.hparams.beta, score)
        return {"loss": loss.mean(), "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
                "rewards/accuracy": (cr > rj).float().mean(), "rewards/margin": (cr - rj).mean(),
                "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = real_tokens(batch)
        stats = self.pair_stats(batch)
        n = len(batch["score"])
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, batch_size=n)
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats = self.pair_stats(batch)
        n = len(batch["score"])
        self.log("val/loss", stats["loss"], prog_bar=True, batch_size=n, sync_dist=True)  # mean over ranks
        self.log_dict({f"val/{k}": v for k, v in stats.items() if k != "loss"}, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizer(self.policy.named_parameters(), self.hparams.optimizer or {},
                                   self.hparams.schedule or {}, self.hparams.total_steps)


@torch.no_grad()
def preference_report(module: DpoModule, loader: DataLoader) -> dict[str, float]:
    """On held-out pairs: the DPO loss (with the pairs' soft labels when the step uses them), how often the
    policy itself gives the chosen reply the higher log-prob, and the implicit reward accuracy and margin."""
    prefers, acc, margin, loss, n = 0.0, 0.0, 0.0, 0.0, 0
    with evaluating(module.policy):
        for batch in loader:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            pc, pr = batch_logps(module.policy, batch).chunk(2)
            rc, rr = module.reference_logps(batch).chunk(2)
            score = batch["score"] if module.hparams.soft_labels else None
            losses, cr, rj = dpo_loss(pc, pr, rc, rr, module.hparams.beta, score)
            loss += float(losses.sum())
            prefers += float((pc > pr).sum())
            acc += float((cr > rj).sum())
            margin += float((cr - rj).sum())
            n += len(pc)
    return {"val/loss": loss / max(n, 1), "val/policy_prefers_chosen": prefers / max(n, 1),
            "val/rewards/accuracy": acc / max(n, 1), "val/rewards/margin": margin / max(n, 1)}


def load_policy_and_reference(spec: DpoSpec, ctx: StepContext):
    """The trainable policy (peft applied), the frozen reference (None: the policy with adapters off), the tokenizer."""
    base, tokenizer = load_model(ctx.model_source(spec.model))
    if spec.reference is not None:
        reference, _ = load_model(ctx.model_source(spec.reference))
    else:
        reference = None if spec.peft.is_adapter else copy.deepcopy(base)
    if reference is not None:
        reference.eval().requires_grad_(False)
    return apply_peft(base, spec.peft, tokenizer), reference, tokenizer


def run(spec: DpoSpec, ctx: StepContext) -> StepOutput:
    """Load pairs and models, report held-out preferences, train with DPO, save, report again."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    policy, reference, tokenizer = load_policy_and_reference(spec, ctx)
    data = spec.data
    train_rows, eval_rows = load_preferences(data, ctx.seed, ctx.resolve_path,
                                             lambda name: ctx.step(name).path("data"), tokenizer)
    held = encode_pairs(eval_rows, tokenizer, data.max_length)
    if spec.packing_spec() is not None:
        check_packable(policy)
    collate = pair_collate(spec, tokenizer.pad_token_id)
    train_loader, train = datasources.training_loader(train_rows, lambda rows: encode_pairs(rows, tokenizer,
                                                                                            data.max_length),
                                                      spec.batch_size, ctx.seed, collate, drop_last=True)
    val_loader = DataLoader(held, batch_size=spec.batch_size, collate_fn=collate)

    mean_len = sum(len(it["chosen"][0]) + len(it["rejected"][0]) for it in train) / max(len(train), 1)
    steps = total_steps(spec.loop(), int(mean_len * spec.batch_size * spec.accumulate))
    module = DpoModule(policy, reference, beta=spec.beta, soft_labels=spec.soft_labels,
                       optimizer=spec.optimizer.model_dump(), schedule=spec.schedule.model_dump(), total_steps=steps)
    before = preference_report(module, val_loader)
    trainable, total = count_parameters(policy)
    trainer = make_trainer(ctx, spec.loop(), steps, params=trainable)
    fit(trainer, module, ctx=ctx, train_dataloaders=train_loader, val_dataloaders=val_loader)
    after = preference_report(module, val_loader)
    ctx.log_metrics(after, step=trainer.global_step)

    outputs = save_outputs(policy, tokenizer, ctx.out_dir, merge=spec.merged)
    pairs = datasources.trained_rows(train_rows, trainer.global_step, spec.batch_size * spec.accumulate * world_size())
    metrics = {**after, **{f"before/{k}": v for k, v in before.items()},
               **{k: float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss"},
               "train/steps": trainer.global_step, "params/trainable": trainable, "params/total": total,
               "data/train_pairs": pairs, "data/eval_pairs": len(held), **perf_metrics(trainer)}
    if mixed := datasources.mixture_metrics(train_rows, pairs):
        metrics.update(mixed)
        print(f"{ctx.name}: {datasources.describe_mixture(mixed, train_rows.sources)}", flush=True)
    ctx.log_table(random.Random(ctx.seed).sample(eval_rows, min(20, len(eval_rows))), "samples/eval_pairs.json")
    log_outputs(ctx, outputs)
    print(f"{ctx.name}: held-out pairs where the policy prefers the chosen reply "
          f"{before['val/policy_prefers_chosen']:.1%} -> {after['val/policy_prefers_chosen']:.1%}; "
          f"reward accuracy {after['val/rewards/accuracy']:.1%}", flush=True)
    return StepOutput(outputs=outputs, metrics=metrics, info={"beta": spec.beta, "peft": spec.peft.method,
                                                              "effort": effort(examples=pairs, of="pairs")})
