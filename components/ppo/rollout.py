"""Rollouts whose log-probs belong to the policy: plain sampling, then one forward pass that scores it all.

`generate` samples with top_k 0 and top_p 1 (filtering would make the stored log-probs wrong) at the
step's temperature; log-probs of policy, reference and training all come from `response_logprobs`, with
the same temperature, so the first PPO minibatch sees a ratio of exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.ppo import core
from components.lib.rewards import position_ids, sequence_rewards, token_scores


@dataclass
class Rollout:
    """One batch of episodes; per-token tensors are (batch, response_len)."""

    query: torch.Tensor        # left-padded prompt ids
    query_mask: torch.Tensor
    responses: torch.Tensor    # truncated after the first EOS, pad beyond
    valid: torch.Tensor        # tokens up to and including the first EOS
    seq_end: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt+response ids and their attention mask."""
        return torch.cat([self.query, self.responses], 1), torch.cat([self.query_mask, self.valid.long()], 1)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The episodes at `idx`."""
        return Rollout(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation continues from the right edge)."""
    from trl.trainer.utils import pad

    seqs = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad(seqs, padding_value=pad_id, padding_side="left")
    mask = pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(policy, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, greedy: bool = False) -> Rollout:
    """Sample one response per prompt, cut after its first EOS."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=not greedy,
                              temperature=temperature if not greedy else 1.0, top_k=0, top_p=1.0,
                              eos_token_id=eos_id, pad_token_id=pad_id)
    out = policy.generate(input_ids=query, attention_mask=query_mask, generation_config=config)
    responses = out[:, query.shape[1]:]
    if responses.shape[1] < max_new_tokens:  # every row stopped early: pad to the window
        fill = torch.full((len(responses), max_new_tokens - responses.shape[1]), pad_id, device=responses.device)
        responses = torch.cat([responses, fill], 1)
    valid, seq_end, has_eos = core.first_eos_mask(responses, eos_id)
    responses = torch.where(valid, responses, torch.full_like(responses, pad_id))
    return Rollout(query, query_mask, responses, valid, seq_end, has_eos)


def response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, context: int, responses: torch.Tensor,
                      temperature: float, value_head: torch.nn.Module | None = None, entropy: bool = False):
    """(log π(y_t), entropy_t or None, values_t or None) for the response tokens; invalid positions are 1.0."""
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                output_hidden_states=value_head is not None, use_cache=False)
    logits = out.logits[:, context - 1:-1].float()
    if entropy:
        logp, ent = selective_log_softmax_and_entropy(logits, responses, temperature=temperature)
    else:
        logp, ent = selective_log_softmax(logits, responses, temperature=temperature), None
    valid = mask[:, context:].bool()
    logp = torch.where(valid, logp, torch.full_like(logp, core.INVALID_LOGPROB))
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, context - 1:-1].float()).squeeze(-1)
    return logp, ent, values


def critic_values(critic, ids: torch.Tensor, mask: torch.Tensor, context: int) -> torch.Tensor:
    """Per-token values from a reward-model-shaped critic: the state before each response token."""
    return token_scores(critic, ids, mask)[:, context - 1:-1]


@torch.no_grad()
def model_scores(reward_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores of prompt+response, read at the last valid token (the EOS)."""
    return sequence_rewards(reward_model, ids, mask)
