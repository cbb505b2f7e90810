"""The PPO Lightning module: each training step is one iteration (rollout, score, GAE, epochs × minibatches).

Manual optimization because one batch of prompts feeds several optimizer steps, which Lightning's
automatic loop cannot express. One optimizer covers the policy and the critic (as TRL does).
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from components.ppo import core
from components.ppo.rollout import Rollout, critic_values, response_logprobs, sample
from components.lib.decoding import Decoder
from components.lib.rollout import encode_prompts, minibatch_passes, reference_logprobs
from components.lib.training import configure_optimizer


class Scorer(torch.nn.Module):
    """Sequence scores: reward model (minus its reference mean) plus weighted verifiable rewards.

    Also reports the model score and the *true* reward (a verifiable function that is only measured).
    """

    def __init__(self, reward_model=None, reference_mean: float = 0.0, reward_fn: Callable | None = None,
                 reward_weight: float = 1.0, true_fn: Callable | None = None, tokenizer=None,
                 reward_scale: float = 1.0):
        super().__init__()
        self.reward_model = reward_model
        self.reference_mean, self.reward_fn, self.reward_weight = reference_mean, reward_fn, reward_weight
        self.reward_scale = reward_scale
        self.true_fn, self.tokenizer = true_fn, tokenizer

    @torch.no_grad()
    def forward(self, roll: Rollout, rows: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from components.ppo.rollout import model_scores

        ids, mask = roll.full()
        scores = torch.zeros(len(rows), device=ids.device)
        extras: dict[str, torch.Tensor] = {}
        if self.reward_model is not None:
            extras["model_score"] = (model_scores(self.reward_model, ids, mask) - self.reference_mean) \
                / self.reward_scale
            scores = scores + extras["model_score"]
        texts = self.tokenizer.batch_decode(roll.responses, skip_special_tokens=True) \
            if self.reward_fn or self.true_fn else []
        if self.reward_fn is not None:
            verifiable = torch.tensor([self.reward_fn(r["prompt"], t, r) for r, t in zip(rows, texts)],
                                      device=ids.device, dtype=torch.float)
            scores = scores + self.reward_weight * verifiable
        if self.true_fn is not None:
            extras["true_reward"] = torch.tensor([self.true_fn(r["prompt"], t, r) for r, t in zip(rows, texts)],
                                                 device=ids.device, dtype=torch.float)
        return scores, extras


class PPOModule(L.LightningModule):
    """Policy (+ value head or critic), frozen reference and scorer; `training_step` runs one PPO iteration."""

    def __init__(self, policy, tokenizer, scorer: Scorer, reference=None, critic=None, value_head=None,
                 optimizer: dict | None = None, schedule: dict | None = None,
                 total_steps: int = 160, grad_clip: float | None = 1.0, epochs: int = 4, minibatches: int = 1,
                 temperature: float = 0.7, max_new_tokens: int = 16, max_prompt_length: int = 128,
                 kl_coef: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10_000,
                 kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95, clip: float = 0.2,
                 value_clip: float = 0.2, vf_coef: float = 0.1, whiten_rewards: bool = False,
                 missing_eos_penalty: float | None = 1.0, generation_cache: str = "auto",
                 generation_compile: bool | str = "auto", seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["policy", "tokenizer", "scorer", "reference", "critic", "value_head"])
        self.decoder = Decoder(generation_cache, generation_compile)  # trainer.generation
        self.automatic_optimization = False
        self.policy, self.scorer, self.reference, self.critic, self.value_head = \
            policy, scorer, reference, critic, value_head
        self.tokenizer = tokenizer
        self.kl_ctl = core.AdaptiveKL(kl_coef, kl_target, kl_horizon)
        self.history: list[dict[str, float]] = []
        self.first_minibatch: dict[str, float] = {}
        self.shuffle = torch.Generator().manual_seed(seed)

    # -- rollout ----------------------------------------------------------------------------------

    def _reference_logprobs(self, ids, mask, context, responses) -> torch.Tensor:
        """Reference log-probs: the frozen copy, or with LoRA the same model with its adapter disabled."""
        return reference_logprobs(self.policy, self.reference, ids, mask, context, responses, self.hparams.temperature)

    def encode(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids, each cut to max_prompt_length from the left."""
        return encode_prompts(self.tokenizer, rows, self.hparams.max_prompt_length, self.device)

    @torch.no_grad()
    def rollout(self, rows: list[dict], greedy: bool = False) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """Sample responses and compute everything PPO needs from them, without gradients."""
        hp, tok = self.hparams, self.tokenizer
        query, query_mask = self.encode(rows)
        roll = sample(self.policy, query, query_mask, hp.max_new_tokens, hp.temperature, tok.eos_token_id,
                      tok.pad_token_id, greedy=greedy, decoder=self.decoder)
        ids, mask = roll.full()
        context = query.shape[1]
        roll.logprobs, entropy, values = response_logprobs(self.policy, ids, mask, context, roll.responses,
                                                           hp.temperature, self.value_head, entropy=True)
        roll.ref_logprobs = self._reference_logprobs(ids, mask, context, roll.responses)
        if self.critic is not None:
            values = critic_values(self.critic, ids, mask, context)
        roll.values = values * roll.valid
        scores, extras = self.scorer(roll, rows)
        if hp.missing_eos_penalty:
            scores = core.penalize_missing_eos(scores, roll.has_eos, hp.missing_eos_penalty)
        roll.scores = scores
        extras["kl"] = core.kl_per_token(roll.logprobs, roll.ref_logprobs, hp.kl_estimator) * roll.valid
        extras["entropy"] = entropy
        return roll, extras

    def advantages(self, roll: Rollout, kl: torch.Tensor) -> None:
        """Per-token rewards (score at the EOS, −β·KL everywhere), GAE, whitened advantages."""
        hp = self.hparams
        rewards = core.token_rewards(roll.scores, kl, self.kl_ctl.value, roll.valid, roll.seq_end)
        if hp.whiten_rewards:
            rewards = core.masked_whiten(rewards, roll.valid, shift_mean=False)
        adv, roll.returns = core.gae(rewards, roll.values, roll.valid, hp.gamma, hp.lam)
        roll.advantages = core.masked_whiten(adv, roll.valid)

    # -- update -----------------------------------------------------------------------------------

    def _losses(self, sub: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        ids, mask = sub.full()
        context = sub.query.shape[1]
        logp, _, values = response_logprobs(self.policy, ids, mask, context, sub.responses, hp.temperature,
                                            self.value_head)
        if self.critic is not None:
            values = critic_values(self.critic, ids, mask, context)
        pg, stats = core.policy_loss(logp, sub.logprobs, sub.advantages, sub.valid, hp.clip)
        vf, vstats = core.value_loss(values, sub.values, sub.returns, sub.valid, hp.value_clip)
        stats.update(policy_loss=pg.detach(), value_loss=vf.detach(), value_clipfrac=vstats["clipfrac"])
        return pg + hp.vf_coef * vf, stats

    def update(self, roll: Rollout) -> dict[str, float]:
        """`epochs` passes, each reshuffled into `minibatches` optimizer steps; mean diagnostics."""
        hp = self.hparams
        means, self.first_minibatch = minibatch_passes(self, roll, hp.epochs, hp.minibatches, self.shuffle,
                                                       lambda sub, parts: self._losses(sub), hp.grad_clip)
        return means

    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        roll, extras = self.rollout(rows)
        kl_sum = extras["kl"].sum(1)
        self.advantages(roll, extras["kl"])
        stats = self.update(roll)
        metrics = {
            "reward/mean": float(roll.scores.mean()),
            "ppo/kl": float(kl_sum.mean()), "ppo/beta": self.kl_ctl.value,
            "ppo/non_score_reward": float(-self.kl_ctl.value * kl_sum.mean()),
            "ppo/entropy": float(core.masked_mean(extras["entropy"], roll.valid)),
            "ppo/clipfrac": stats["clipfrac"], "ppo/approx_kl": stats["approx_kl"], "ppo/ratio": stats["ratio"],
            "ppo/policy_loss": stats["policy_loss"], "ppo/value_loss": stats["value_loss"],
            "ppo/value_clipfrac": stats["value_clipfrac"],
            "ppo/explained_variance": float(core.explained_variance(roll.values, roll.returns, roll.valid)),
            "ppo/response_length": float(roll.valid.sum(1).float().mean()),
            "ppo/eos_fraction": float(roll.has_eos.float().mean()),
        }
        for key in ("model_score", "true_reward"):
            if key in extras:
                metrics[f"reward/{key}"] = float(extras[key].mean())
        self.kl_ctl.update(float(kl_sum.mean()), len(rows))
        self.history.append(metrics)
        self.log_dict(metrics, on_step=True, batch_size=len(rows))
        return torch.tensor(stats["policy_loss"] + self.hparams.vf_coef * stats["value_loss"])  # for the NaN guard

    def configure_optimizers(self):
        named = list(self.policy.named_parameters())
        for prefix, extra in (("critic.", self.critic), ("value_head.", self.value_head)):
            if extra is not None:
                named += [(prefix + n, p) for n, p in extra.named_parameters()]
        return configure_optimizer(named, self.hparams.optimizer or {"lr": 1e-5}, self.hparams.schedule or {},
                                   self.hparams.total_steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo"] = {"beta": self.kl_ctl.value, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo", {})
        self.kl_ctl.value = state.get("beta", self.kl_ctl.value)
        self.history = state.get("history", [])
