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

from components.context import StepContext, StepOutput
from components.models import load_causal_lm, load_tokenizer
from components.peft_methods import apply_peft, save_outputs
from components.preferences import load_preferences
from components.training import configure_optimizer, count_parameters, fit, make_trainer, total_steps
from schemas.base import OptimizerSpec, ScheduleSpec
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


def encode_pair(tokenizer, prompt: str, reply: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids + EOS), cut to max_length: the prompt from the left, then the reply."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    c = c[:max_length - min(len(p), max_length // 2)]
    p = p[len(p) - (max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p, c


def encode_pairs(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Token ids of prompt+chosen and prompt+rejected with their completion masks, and the soft label."""
    out = []
    for row in rows:
        item = {"score": float(row.get("score", 1.0))}
        for side in ("chosen", "rejected"):
            p, c = encode_pair(tokenizer, row["prompt"], row[side], max_length)
            item[side] = (p + c, [0] * len(p) + [1] * len(c))
        out.append(item)
    return out


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """One right-padded batch: the chosen rows first, then the rejected rows (one forward pass for both)."""
    seqs = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (row, mask) in enumerate(seqs):
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        comp[i, :len(row)] = torch.tensor(mask)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
            "score": torch.tensor([it["score"] for it in items])}


class DpoModule(L.LightningModule):
    """The policy under DPO; the reference is a frozen model, or the policy with its adapter disabled."""

    def __init__(self, policy, reference=None, beta: float = 0.1, soft_labels: bool = True,
                 optimizer: OptimizerSpec = OptimizerSpec(), schedule: ScheduleSpec = ScheduleSpec(),
                 steps: int = 100):
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
                return completion_logps(self.reference, batch["input_ids"], batch["attention_mask"],
                                        batch["completion_mask"])
            with self.policy.disable_adapter():
                return completion_logps(self.policy, batch["input_ids"], batch["attention_mask"],
                                        batch["completion_mask"])

    def pair_stats(self, batch: dict) -> dict:
        logps = completion_logps(self.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = self.reference_logps(batch)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        score = batch["score"] if self.hparams.soft_labels else None
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, self.hparams.beta, score)
        return {"loss": loss.mean(), "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
                "rewards/accuracy": (cr > rj).float().mean(), "rewards/margin": (cr - rj).mean(),
                "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = int(batch["attention_mask"].sum())
        stats = self.pair_stats(batch)
        n = len(batch["score"])
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, batch_size=n)
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats = self.pair_stats(batch)
        n = len(batch["score"])
        self.log("val/loss", stats["loss"], prog_bar=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in stats.items() if k != "loss"}, batch_size=n)

    def configure_optimizers(self):
        return configure_optimizer(self.policy.named_parameters(), self.hparams.optimizer, self.hparams.schedule,
                                   self.hparams.steps)


@torch.no_grad()
def preference_report(module: DpoModule, loader: DataLoader) -> dict[str, float]:
    """On held-out pairs: how often the policy itself gives the chosen reply the higher log-prob, and the
    DPO reward accuracy and margin against the reference."""
    was = module.policy.training
    module.policy.eval()
    prefers, acc, margin, n = 0.0, 0.0, 0.0, 0
    for batch in loader:
        batch = {k: v.to(module.device) for k, v in batch.items()}
        logps = completion_logps(module.policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        pc, pr = logps.chunk(2)
        rc, rr = module.reference_logps(batch).chunk(2)
        _, cr, rj = dpo_loss(pc, pr, rc, rr, module.hparams.beta)
        prefers += float((pc > pr).sum())
        acc += float((cr > rj).sum())
        margin += float((cr - rj).sum())
        n += len(pc)
    module.policy.train(was)
    return {"policy_prefers_chosen": prefers / max(n, 1), "rewards/accuracy": acc / max(n, 1),
            "rewards/margin": margin / max(n, 1)}


def load_policy_and_reference(spec: DpoSpec, ctx: StepContext, tokenizer):
    """The trainable policy (peft applied) and the frozen reference (None: the policy with adapters off)."""
    base = load_causal_lm(ctx.model_source(spec.model))
    if spec.reference is not None:
        reference = load_causal_lm(ctx.model_source(spec.reference))
    else:
        reference = None if spec.peft.is_adapter else copy.deepcopy(base)
    if reference is not None:
        reference.eval().requires_grad_(False)
    return apply_peft(base, spec.peft, tokenizer), reference


def run(spec: DpoSpec, ctx: StepContext) -> StepOutput:
    """Load pairs and models, report held-out preferences, train with DPO, save, report again."""
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(ctx.model_source(spec.model))
    train_rows, eval_rows = load_preferences(spec.data, ctx, tokenizer)
    train = encode_pairs(train_rows, tokenizer, spec.data.max_length)
    held = encode_pairs(eval_rows, tokenizer, spec.data.max_length)
    collate = lambda items: collate_pairs(items, tokenizer.pad_token_id)  # noqa: E731
    gen = torch.Generator().manual_seed(ctx.seed)
    train_loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=gen, collate_fn=collate,
                              drop_last=len(train) >= spec.batch_size)
    val_loader = DataLoader(held, batch_size=spec.batch_size, collate_fn=collate)

    policy, reference = load_policy_and_reference(spec, ctx, tokenizer)
    mean_len = sum(len(it["chosen"][0]) + len(it["rejected"][0]) for it in train) / max(len(train), 1)
    steps = total_steps(spec, int(mean_len * spec.batch_size * spec.accumulate))
    module = DpoModule(policy, reference, beta=spec.beta, soft_labels=spec.soft_labels, optimizer=spec.optimizer,
                       schedule=spec.schedule, steps=steps)
    before = preference_report(module, val_loader)
    trainable, total = count_parameters(policy)
    trainer = make_trainer(ctx, spec, steps, params=trainable)
    fit(trainer, module, ctx=ctx, train_dataloaders=train_loader, val_dataloaders=val_loader)
    after = preference_report(module, val_loader)

    outputs = save_outputs(policy, tokenizer, ctx.out_dir, merge=spec.merged)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    metrics.update({"eval/policy_prefers_chosen_before": before["policy_prefers_chosen"],
                    "eval/policy_prefers_chosen_after": after["policy_prefers_chosen"],
                    "eval/rewards/accuracy": after["rewards/accuracy"], "eval/rewards/margin": after["rewards/margin"],
                    "params/trainable": trainable, "params/total": total, "data/train_pairs": len(train),
                    "data/eval_pairs": len(held)})
    ctx.log_metrics(metrics, step=steps)
    ctx.log_table(random.Random(ctx.seed).sample(eval_rows, min(20, len(eval_rows))), "samples/eval_pairs.json")
    print(f"{ctx.name}: held-out pairs where the policy prefers the chosen reply "
          f"{before['policy_prefers_chosen']:.1%} -> {after['policy_prefers_chosen']:.1%}; "
          f"reward accuracy {after['rewards/accuracy']:.1%}", flush=True)
    return StepOutput(outputs=outputs, metrics=metrics, info={"beta": spec.beta, "peft": spec.peft.method})
