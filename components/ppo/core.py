"""The PPO arithmetic for language models, as pure tensor functions (ALGORITHMS.md §1).

Written by hand because TRL dropped its PPO trainer (the experimental copy is not a stable API) and
these few formulas are what the correctness tests pin down: KL estimators and masked means (from
components/lib/rollout.py, shared with grpo), per-token rewards, GAE,
masked whitening, the clipped policy and value losses, the adaptive KL controller.
Shapes: `(batch, response_len)` for per-token tensors, `(batch,)` for per-sequence ones.
"""

from __future__ import annotations

import torch

from components.lib.rollout import INVALID_LOGPROB, first_eos_mask, kl_per_token, masked_mean  # noqa: F401


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected by default, as TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale `x` to mean 0 (unless `shift_mean` is false) and variance 1 on the mask; 0 elsewhere."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace everything after the first EOS with pad."""
    valid, _, _ = first_eos_mask(responses, eos_id)
    return torch.where(valid, responses, torch.full_like(responses, pad_id))


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the scores of responses that never ended (TRL's `missing_eos_penalty`)."""
    return scores - penalty * (~has_eos).to(scores.dtype)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float, valid: torch.Tensor,
                  seq_end: torch.Tensor) -> torch.Tensor:
    """r_t = −β·kl_t on valid tokens, plus the sequence score on the last valid token (the EOS)."""
    rewards = -beta * kl * valid.to(kl.dtype)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, seq_end] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) -> (advantages, returns), unwhitened.

    Values outside `mask` count as 0, so the bootstrap past a sequence's end is 0.
    """
    values = values * mask.to(values.dtype)
    rewards = rewards * mask.to(rewards.dtype)
    width = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss masked_mean(max(−Aρ, −A·clip(ρ, 1±ε))) and its diagnostics."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5·masked_mean(max((V−R)², (clip(V, V_old±ε)−R)²))."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V)/Var(R) on the mask: 1 for a perfect critic, ≤ 0 for a useless one."""
    var_r = masked_var(returns, mask, unbiased=False)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_r.clamp(min=1e-8)


class AdaptiveKL:
    """β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) (Ziegler et al. 2019); fixed when target is None."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        """Adjust β after a batch of `n` episodes whose mean summed KL was `kl`; return the new β."""
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon
        return self.value
