"""PPO's side of a rollout: critic values and reward-model scores.

Sampling and response log-probs live in components/lib/rollout.py (shared with grpo): `sample` draws with
top_k 0 and top_p 1 at the step's temperature, and policy, reference and training log-probs all come from
`response_logprobs` with the same temperature, so the first PPO minibatch sees a ratio of exactly 1.
"""

from __future__ import annotations

import torch

from components.lib.rewards import sequence_rewards, token_scores
from components.lib.rollout import Rollout, left_pad, response_logprobs, sample  # noqa: F401 - shared with grpo


def critic_values(critic, ids: torch.Tensor, mask: torch.Tensor, context: int) -> torch.Tensor:
    """Per-token values from a reward-model-shaped critic: the state before each response token."""
    return token_scores(critic, ids, mask)[:, context - 1:-1]


@torch.no_grad()
def model_scores(reward_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores of prompt+response, read at the last valid token (the EOS)."""
    return sequence_rewards(reward_model, ids, mask)
