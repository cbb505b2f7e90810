"""Rollouts whose log-probs belong to the policy, and the per-token arithmetic the RL kinds share (ppo, grpo).

`sample` draws with top_k 0 and top_p 1 (filtering would make the stored log-probs wrong) at the step's
temperature; log-probs of policy, reference and training all come from `response_logprobs`, with the same
temperature, so the first optimisation pass over a batch sees a ratio of exactly 1 (ALGORITHMS.md §1,
check 6). Shapes: `(batch, response_len)` for per-token tensors, `(batch,)` for per-sequence ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.lib.decoding import Decoder
from components.lib.rewards import position_ids

INVALID_LOGPROB = 1.0  # filler for log-probs past the end: equal on both sides, so the KL there is 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled tokens (Schulman 2020, "Approximating KL divergence").

    With r = log π_ref − log π: k1 = −r (unbiased, can be negative); k3 = (e^r − 1) − r (unbiased, never
    negative), which is TRL GRPOTrainer's `exp(ref − logp) − (ref − logp) − 1`.
    """
    logr = ref_logp - logp
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def first_eos_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, seq_end, has_eos): tokens up to and including the first EOS, its index, whether one exists.

    Without an EOS the whole window is valid and `seq_end` is its last index.
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    width = responses.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, width - 1, dtype=torch.long))
    valid = torch.arange(width, device=responses.device)[None, :] <= first[:, None]
    return valid, first, has_eos


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
        """The episodes at `idx` (of the same class, so subclasses keep their extra fields)."""
        return type(self)(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (generation continues from the right edge)."""
    from trl.trainer.utils import pad

    seqs = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad(seqs, padding_value=pad_id, padding_side="left")
    mask = pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(policy, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
           eos_id: int, pad_id: int, greedy: bool = False, decoder: Decoder | None = None) -> Rollout:
    """Sample one response per prompt, cut after its first EOS; `decoder` (components/lib/decoding.py, default
    `auto` choices) decodes as `generate` would, token for token under the same seed."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=not greedy,
                              temperature=temperature if not greedy else 1.0, top_k=0, top_p=1.0,
                              eos_token_id=eos_id, pad_token_id=pad_id)
    out = (decoder or Decoder()).generate(policy, query, query_mask, config)
    responses = out[:, query.shape[1]:]
    if responses.shape[1] < max_new_tokens:  # every row stopped early: pad to the window
        fill = torch.full((len(responses), max_new_tokens - responses.shape[1]), pad_id, device=responses.device)
        responses = torch.cat([responses, fill], 1)
    valid, seq_end, has_eos = first_eos_mask(responses, eos_id)
    responses = torch.where(valid, responses, torch.full_like(responses, pad_id))
    return Rollout(query, query_mask, responses, valid, seq_end, has_eos)


def response_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, context: int, responses: torch.Tensor,
                      temperature: float, value_head: torch.nn.Module | None = None, entropy: bool = False,
                      packed: int | None = None):
    """(log π(y_t), entropy_t or None, values_t or None) for the response tokens; invalid positions are 1.0.
    `packed`: run the episodes packed into rows of at most this many tokens (`packed_forward`), else padded."""
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    logits, hidden = (packed_forward if packed else padded_forward)(model, ids, mask, context,
                                                                     value_head is not None, packed)
    logits = logits.float()
    if entropy:
        logp, ent = selective_log_softmax_and_entropy(logits, responses, temperature=temperature)
    else:
        logp, ent = selective_log_softmax(logits, responses, temperature=temperature), None
    valid = mask[:, context:].bool()
    logp = torch.where(valid, logp, torch.full_like(logp, INVALID_LOGPROB))
    values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
    return logp, ent, values


def padded_forward(model, ids, mask, context: int, hidden: bool, _=None):
    """Logits (and last hidden states) at the positions that predict the response tokens, `(batch,
    response_len, ·)`, from the left-padded batch as it is."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=hidden,
                use_cache=False)
    return out.logits[:, context - 1:-1], out.hidden_states[-1][:, context - 1:-1] if hidden else None


def packed_forward(model, ids, mask, context: int, hidden: bool, capacity: int):
    """`padded_forward`'s result, computed on the episodes' real tokens only: each episode's prompt (its left
    padding dropped) and response (up to its first EOS) packed by best-fit decreasing into rows of at most
    `capacity` tokens, positions restarting per episode, so that no position is spent on padding
    (components/lib/packing.py). The positions past an episode's end read column 0 of its row; the caller
    masks them."""
    from components.lib.packing import pack

    real = mask.bool()
    cpu_ids, cpu_real = ids.cpu(), real.cpu()
    batch = pack([{"input_ids": cpu_ids[i][cpu_real[i]].tolist()} for i in range(len(ids))], capacity, pad_id=0)
    out = model(input_ids=batch["input_ids"].to(ids.device), position_ids=batch["position_ids"].to(ids.device),
                output_hidden_states=hidden, use_cache=False)
    lengths = real.sum(1)
    prompt = real[:, :context].sum(1)
    last = batch["last_index"].to(ids.device)
    start = last[:, 1] - lengths + 1
    t = torch.arange(ids.shape[1] - context, device=ids.device)
    cols = torch.where(real[:, context:], (start + prompt - 1)[:, None] + t[None, :], 0)  # predicts token t
    rows = last[:, :1].expand_as(cols)
    return out.logits[rows, cols], out.hidden_states[-1][rows, cols] if hidden else None


def encode_prompts(tokenizer, rows: list[dict], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids of the rows' `prompt`, each cut to `max_length` tokens from the left."""
    ids = [tokenizer(r["prompt"])["input_ids"][-max_length:] or [tokenizer.eos_token_id] for r in rows]
    return left_pad(ids, tokenizer.pad_token_id, device)


def reference_logprobs(policy, reference, ids: torch.Tensor, mask: torch.Tensor, context: int,
                       responses: torch.Tensor, temperature: float, packed: int | None = None) -> torch.Tensor:
    """Reference log-probs: the frozen copy `reference`, or (None) the LoRA policy with its adapter disabled."""
    if reference is not None:
        return response_logprobs(reference, ids, mask, context, responses, temperature, packed=packed)[0]
    with policy.disable_adapter():
        return response_logprobs(policy, ids, mask, context, responses, temperature, packed=packed)[0]


def minibatch_passes(module, roll, epochs: int, minibatches: int, generator: torch.Generator, loss_of,
                     grad_clip: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """`epochs` passes over a rollout, each reshuffled into `minibatches` optimizer steps of a manually optimized
    Lightning `module` (ppo, grpo); `loss_of(sub, parts)` gives (loss, stats) of one minibatch out of `parts`.
    Returns (mean stats over every step, the first step's stats)."""
    opt, sched = module.optimizers(), module.lr_schedulers()
    totals: dict[str, float] = {}
    first: dict[str, float] = {}
    n = 0
    for _ in range(epochs):
        order = torch.randperm(len(roll.scores), generator=generator).to(roll.scores.device)
        parts = order.chunk(minibatches)
        for part in parts:
            loss, stats = loss_of(roll.select(part), len(parts))
            opt.zero_grad()
            module.manual_backward(loss)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(  # not module.clip_gradients: it refuses fused optimizers
                    [p for g in opt.param_groups for p in g["params"] if p.grad is not None], grad_clip)
            opt.step()
            sched.step()
            stats = {k: float(v) for k, v in stats.items()}
            first = first or stats
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}, first
