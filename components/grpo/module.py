"""The GRPO Lightning module: each training step is one iteration (G completions per prompt, rewards, group
advantages, then `epochs` × `minibatches` optimizer steps on the clipped loss).

Manual optimization because one batch of completions feeds several optimizer steps. The old log-probs are
computed once, at rollout time, by the same forward function the update uses, so the first pass has ratio 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch

from components.grpo import core
from components.lib.decoding import Decoder
from components.lib.rollout import (Rollout, encode_prompts, kl_per_token, masked_mean, minibatch_passes,
                                    reference_logprobs, response_logprobs, sample)
from components.lib.training import configure_optimizer


@dataclass
class GroupRollout(Rollout):
    """A rollout of G completions per prompt; `loss_mask` is `valid` less the completions overlong filtering drops."""

    loss_mask: torch.Tensor | None = None


class Rewards(torch.nn.Module):
    """Reward sources, each reported on its own: functions, a reward model (centred, scaled), overlong punishment.

    Also the *true* reward: a function only measured, never optimized.
    """

    def __init__(self, names: list[str], weights: list[float], functions: dict[str, Callable], tokenizer,
                 reward_model=None, reference_mean: float = 0.0, reward_scale: float = 1.0,
                 overlong: tuple[int, int] | None = None, true_fn: Callable | None = None):
        super().__init__()
        self.names, self.functions, self.tokenizer = names, functions, tokenizer
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float), persistent=False)
        self.reward_model, self.reference_mean, self.reward_scale = reward_model, reference_mean, reward_scale
        self.overlong, self.true_fn = overlong, true_fn

    @torch.no_grad()
    def forward(self, roll: Rollout, rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-source rewards (B, K) in `names` order, NaN where a function returned None; extras)."""
        from components.lib.rewards import sequence_rewards

        texts = self.tokenizer.batch_decode(roll.responses, skip_special_tokens=True)
        device = roll.responses.device
        extras: dict[str, torch.Tensor] = {}
        columns = []
        for name in self.names:
            if name in self.functions:
                columns.append(torch.tensor(score(self.functions[name], name, rows, texts), device=device))
            elif name == "overlong":
                columns.append(core.soft_overlong_punishment(roll.valid.sum(1), *self.overlong).to(device))
            else:
                ids, mask = roll.full()
                extras["model_score"] = (sequence_rewards(self.reward_model, ids, mask) - self.reference_mean) \
                    / self.reward_scale
                columns.append(extras["model_score"])
        if self.true_fn is not None:
            extras["true_reward"] = torch.tensor(score(self.true_fn, "true_reward", rows, texts), device=device)
        return torch.stack([c.float() for c in columns], 1), extras


def score(fn: Callable, name: str, rows: list[dict], texts: list[str]) -> list[float]:
    """fn(prompt, completion, row) for every completion; None becomes NaN (not scored), anything else not a number
    is an error."""
    out = []
    for row, text in zip(rows, texts):
        value = fn(row["prompt"], text, row)
        if value is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise TypeError(f"rewards: {name} returned {value!r} ({type(value).__name__}) for a completion; a reward "
                            "function returns a float, or None for a completion it does not score") from None
    return out


class GRPOModule(L.LightningModule):
    """Policy, reference and rewards; `training_step` runs one GRPO iteration on a batch of prompts."""

    def __init__(self, policy, tokenizer, rewards: Rewards, reference=None, optimizer: dict | None = None,
                 schedule: dict | None = None, total_steps: int = 40, grad_clip: float | None = 1.0,
                 iterations: int = 40, group_size: int = 8, advantage: str = "grpo", loss_type: str = "dapo",
                 clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 dynamic_sampling: bool = False, overlong_filter: bool = False, epochs: int = 1,
                 minibatches: int = 1, temperature: float = 1.0, max_new_tokens: int = 16,
                 max_prompt_length: int = 128, generation_cache: str = "auto",
                 generation_compile: bool | str = "auto", packing: bool = False, packing_length: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "tokenizer", "rewards", "reference"])
        self.decoder = Decoder(generation_cache, generation_compile)  # trainer.generation
        self.automatic_optimization = False
        self.policy, self.tokenizer, self.rewards, self.reference = policy, tokenizer, rewards, reference
        self.history: list[dict[str, float]] = []
        self.first_pass: dict[str, float] = {}
        self.skipped_groups = 0
        self.shuffle = torch.Generator().manual_seed(seed)

    # -- rollout ----------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, rows: list[dict], greedy: bool = False) -> tuple[GroupRollout, dict[str, torch.Tensor]]:
        """One completion per row (repeat rows for groups): old and reference log-probs, rewards, KL, entropy."""
        hp, tok = self.hparams, self.tokenizer
        query, query_mask = encode_prompts(tok, rows, hp.max_prompt_length, self.device)
        roll = sample(self.policy, query, query_mask, hp.max_new_tokens, hp.temperature, tok.eos_token_id,
                      tok.pad_token_id, greedy=greedy, decoder=self.decoder)
        roll = GroupRollout(**roll.__dict__)
        ids, mask = roll.full()
        context = query.shape[1]
        roll.logprobs, entropy, _ = response_logprobs(self.policy, ids, mask, context, roll.responses,
                                                      hp.temperature, entropy=True, packed=self.packed(ids))
        roll.ref_logprobs = reference_logprobs(self.policy, self.reference, ids, mask, context, roll.responses,
                                               hp.temperature, packed=self.packed(ids))
        per_source, extras = self.rewards(roll, rows)
        roll.scores = core.combine_rewards(per_source, self.rewards.weights)
        roll.loss_mask = roll.valid & roll.has_eos[:, None] if hp.overlong_filter else roll.valid
        extras.update(per_source=per_source, entropy=entropy,
                      kl=kl_per_token(roll.logprobs, roll.ref_logprobs, hp.kl_estimator) * roll.valid)
        return roll, extras

    def packed(self, ids: torch.Tensor) -> int | None:
        """The row length the policy and reference forward passes pack episodes into (`packing`; default the
        padded batch's width, so that no row is longer than a padded one), or None: padded."""
        return (self.hparams.packing_length or ids.shape[1]) if self.hparams.packing else None

    # -- update -----------------------------------------------------------------------------------

    def _loss(self, sub: GroupRollout, num_items: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        ids, mask = sub.full()
        logp = response_logprobs(self.policy, ids, mask, sub.query.shape[1], sub.responses, hp.temperature,
                                 packed=self.packed(ids))[0]
        return core.grpo_loss(logp, sub.logprobs, sub.advantages, sub.loss_mask, hp.loss_type, hp.clip_low,
                              hp.clip_high, sub.ref_logprobs, hp.kl_coef, hp.kl_estimator, hp.max_new_tokens,
                              num_items)

    def update(self, roll: GroupRollout) -> dict[str, float]:
        """`epochs` passes, each reshuffled into `minibatches` optimizer steps; mean diagnostics."""
        hp = self.hparams
        # dapo: the batch's active tokens, split evenly over its optimizer steps (TRL's N·GA/S)
        total = float(roll.loss_mask.sum())

        def loss_of(sub, parts):
            loss, stats = self._loss(sub, total / parts)
            return loss, {k: v for k, v in stats.items() if k != "kl"}

        means, self.first_pass = minibatch_passes(self, roll, hp.epochs, hp.minibatches, self.shuffle, loss_of,
                                                  hp.grad_clip)
        return means

    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        roll, extras = self.rollout([r for r in rows for _ in range(hp.group_size)])
        roll.advantages, zero_std, std = core.group_advantages(roll.scores, hp.group_size, hp.advantage)
        keep = torch.ones_like(roll.has_eos)
        if hp.dynamic_sampling:
            keep = ~zero_std.repeat_interleave(hp.group_size)
            self.skipped_groups += int(zero_std.sum())
        # no update at all when every group was dropped: nothing was clipped, the loss is that of no tokens
        stats = {"clip_fraction": 0.0, "clip_low_fraction": 0.0, "clip_high_fraction": 0.0, "ratio": 1.0,
                 "approx_kl": 0.0, "policy_loss": 0.0}
        if keep.any():
            stats = self.update(roll.select(keep.nonzero().squeeze(1)))
        metrics = self._metrics(roll, extras, zero_std, std, stats)
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, batch_size=len(roll.scores))
        if len(self.history) >= hp.iterations:  # dropped groups take no optimizer steps: count iterations
            self.trainer.should_stop = True
        return torch.tensor(stats["policy_loss"])  # for the NaN guard

    def _metrics(self, roll, extras, zero_std, std, stats) -> dict[str, float]:
        per_source = extras["per_source"]
        metrics = {"reward/mean": float(torch.nanmean(roll.scores))}
        metrics.update({f"reward/{name}": float(torch.nanmean(per_source[:, i]))
                        for i, name in enumerate(self.rewards.names)})
        if "true_reward" in extras:
            metrics["reward/true_reward"] = float(extras["true_reward"].nanmean())
        metrics.update({f"grpo/{k}": v for k, v in stats.items()})
        metrics.update({
            "grpo/kl": float(extras["kl"].sum(1).mean()),
            "grpo/entropy": float(masked_mean(extras["entropy"], roll.valid)),
            "grpo/zero_std_fraction": float(zero_std.float().mean()),
            "grpo/reward_std": float(torch.nan_to_num(std).mean()),
            "grpo/completion_length": float(roll.valid.sum(1).float().mean()),
            "grpo/truncated_fraction": float((~roll.has_eos).float().mean()),
            "grpo/padding_share": 1 - float(roll.full()[1].float().mean())})
        if self.hparams.dynamic_sampling:
            metrics["grpo/skipped_groups"] = float(self.skipped_groups)
        return metrics

    def configure_optimizers(self):
        return configure_optimizer(self.policy.named_parameters(), self.hparams.optimizer or {"lr": 1e-5},
                                   self.hparams.schedule or {}, self.hparams.total_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grpo"] = {"history": self.history, "skipped_groups": self.skipped_groups}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("grpo", {})
        self.history = state.get("history", [])
        self.skipped_groups = state.get("skipped_groups", 0)
