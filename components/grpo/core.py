"""The GRPO family's arithmetic as pure tensor functions: rewards to group-relative advantages, the clipped loss
and its aggregations, DAPO's overlong punishment (ALGORITHMS.md §8).

Each formula is the one TRL 1.16 computes (`trl/trainer/grpo_trainer.py`: `_generate_and_score_completions` for
advantages, `_compute_loss` for the loss; `trl/trainer/rloo_trainer.py` for the leave-one-out baseline;
`trl/rewards/other_rewards.py` for the overlong punishment); tests/components/test_grpo_core.py feeds the same
batches to TRL's `GRPOTrainer._compute_loss`. Shapes: `(B, T)` per token, `(B,)` per completion; a group is G
consecutive rows.
"""

from __future__ import annotations

import torch

from components.lib.rollout import kl_per_token, masked_mean

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")
ADVANTAGES = ("grpo", "dr_grpo", "rloo")


def nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (TRL `trl.trainer.utils.nanstd`); NaN below 2 values."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim)
    var = torch.nansum((x - mean) ** 2, dim=dim) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def combine_rewards(per_source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r = Σ_k w_k·r_k over the sources (B, K), skipping NaN (a source that did not score that completion);
    NaN where no source scored it (TRL: `nansum`, then unscorable rows set to NaN)."""
    total = (per_source * weights.to(per_source)).nansum(1)
    return torch.where(torch.isnan(per_source).all(1), torch.full_like(total, float("nan")), total)


def group_advantages(rewards: torch.Tensor, group_size: int, method: str = "grpo"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages (B,), zero_std (B/G,), std (B/G,)) of rewards grouped G consecutive rows at a time.

    - `grpo` (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): A_i = (r_i − mean_g)/(std_g + 1e-4), std
      Bessel-corrected (TRL `scale_rewards="group"`).
    - `dr_grpo` (Liu et al. 2025, Dr. GRPO, arXiv 2503.20783): A_i = r_i − mean_g (TRL
      `scale_rewards="none"`): no division, so easy and hard questions weigh alike.
    - `rloo` (Ahmadian et al. 2024, arXiv 2402.14740; TRL `RLOOTrainer`): A_i = r_i − (Σ_{j≠i} r_j)/(G − 1)
      = G/(G−1)·(r_i − mean_g).
    NaN rewards (unscored) are left out of the means and get A = 0, as in TRL. `zero_std`: the group's rewards
    are all equal (TRL's `frac_reward_zero_std`), so its advantages are 0 whatever the method.
    """
    if method not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {method!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    std = nanstd(grouped, 1)
    if method == "rloo":
        count = (~torch.isnan(grouped)).sum(1, keepdim=True)
        baseline = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (count - 1)
        adv = grouped - baseline
    else:
        adv = grouped - torch.nanmean(grouped, 1, keepdim=True)
        if method == "grpo":
            adv = adv / (std[:, None] + STD_EPS)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0).reshape(-1), zero_std, std


def soft_overlong_punishment(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13; TRL `get_soft_overlong_punishment`):
    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|)/L_cache up to L_max; −1 beyond."""
    lengths = lengths.float()
    start = max_len - cache
    ramp = (start - lengths) / max(cache, 1)
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_len, ramp, -torch.ones_like(lengths)))


def importance_log_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log r per token (B, T), or GSPO's per sequence (B, 1): log s_i = Σ_t m·(logπ − logπ_old) / max(|o_i|, 1),
    the log of the geometric mean of the token ratios (Zheng et al. 2025, GSPO, arXiv
    2507.18071; TRL `importance_sampling_level="sequence"`)."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None,
              num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """The loss from per-token losses ℓ (TRL `_compute_loss`, one accumulation step on one process):

    - `grpo`, `gspo` (DeepSeekMath Eq. 3): (1/B) Σ_i (1/|o_i|) Σ_t m·ℓ, each completion's token mean, then their
      mean.
    - `dr_grpo` (Liu et al. 2025): Σ m·ℓ / (B · max_completion_length), a constant normaliser, so long
      and short completions weigh alike per token.
    - `dapo` (Yu et al. 2025, §3.3, token-level loss): Σ m·ℓ / N, N = `num_items` active tokens (default: this
      batch's); TRL passes the generation batch's count rescaled to the optimizer step's share of it.
    """
    mask = mask.to(per_token.dtype)
    if loss_type in ("grpo", "gspo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_completion_length or per_token.shape[1]))
    if loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
        return (per_token * mask).sum() / n.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              loss_type: str = "dapo", clip_low: float = 0.2, clip_high: float = 0.2,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, estimator: str = "k3",
              max_completion_length: int | None = None, num_items: float | torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with an optional KL term, aggregated by `loss_type`; and its diagnostics.

    ℓ_{i,t} = −min(w·A_i, clip(w, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_t, with w the token ratio
    exp(logπ − logπ_old) (PPO, Schulman et al. 2017; DAPO's clip-higher ε_high, Yu et al. 2025 §3.1), or for
    `gspo` the sequence ratio s_i (`importance_log_weights`). KL_t is `kl_per_token(logπ, logπ_ref, estimator)`;
    TRL adds k3 = e^(ref−logπ) − (ref−logπ) − 1 with its gradient. Diagnostics as TRL logs them: the share of
    active tokens clipped below (w < 1 − ε_low with A < 0), above (w > 1 + ε_high with A > 0), either; the mean
    ratio, ½(log w)², and the token-mean KL.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    log_w = importance_log_weights(logp, old_logp, mask, "sequence" if loss_type == "gspo" else "token")
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        kl = kl_per_token(logp, ref_logp, estimator)
        if beta:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_items)
    with torch.no_grad():
        low = ((ratio < 1 - clip_low) & (adv < 0)).float()
        high = ((ratio > 1 + clip_high) & (adv > 0)).float()
        stats = {"clip_low_fraction": _mean(low, mask), "clip_high_fraction": _mean(high, mask),
                 "clip_fraction": _mean(torch.maximum(low, high), mask), "ratio": _mean(ratio, mask),
                 "approx_kl": _mean(0.5 * log_w ** 2, mask), "policy_loss": loss.detach()}
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked token mean, or the plain mean over completions of a per-sequence (B, 1) value (as TRL logs)."""
    return x.mean() if x.shape[-1] == 1 else masked_mean(x, mask)
