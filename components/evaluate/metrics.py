"""Held-out scoring: perplexity and next-token top-1/top-5 accuracy (causal), masked-token accuracy (masked)."""

from __future__ import annotations

import math

import torch


def token_blocks(ids, context: int, limit: int) -> torch.Tensor:
    """Up to `limit` consecutive blocks of `context` tokens (one shorter block when the ids are fewer)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = min(len(ids) // context, limit)
    if n == 0:
        return ids[None, :]
    return ids[: n * context].view(n, context)


def text_ids(tokenizer, texts: list[str]) -> list[int]:
    """Texts joined into one stream, each followed by EOS (as tokenize writes its token files)."""
    out: list[int] = []
    for text in texts:
        out += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


@torch.inference_mode()
def score_causal(model, blocks: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean NLL of each next token, its perplexity, and how often the target is the top-1 / in the top-5."""
    nll = top1 = top5 = count = 0.0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        best = logits.topk(5, dim=-1).indices
        top1 += float((best[..., 0] == target).sum())
        top5 += float((best == target[..., None]).any(-1).sum())
        count += target.numel()
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "next_token_top1": top1 / max(count, 1),
            "next_token_top5": top5 / max(count, 1), "tokens": count}


@torch.inference_mode()
def score_masked(model, tokenizer, blocks: torch.Tensor, batch_size: int, probability: float = 0.15,
                 seed: int = 0) -> dict[str, float]:
    """BERT masking with a fixed seed; loss, perplexity and top-1/top-5 accuracy on the selected tokens."""
    from components.pretrain import make_collator, mask_tokens

    collator = make_collator(tokenizer, probability, seed)
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    nll = top1 = top5 = count = 0.0
    for i in range(0, len(blocks), batch_size):
        inputs, labels = mask_tokens(collator, blocks[i:i + batch_size].clone(), special)
        logits = model(input_ids=inputs).logits.float()
        chosen = labels != -100
        logits, target = logits[chosen], labels[chosen]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        best = logits.topk(5, dim=-1).indices
        top1 += float((best[:, 0] == target).sum())
        top5 += float((best == target[:, None]).any(-1).sum())
        count += target.numel()
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "masked_accuracy": top1 / max(count, 1),
            "masked_top5": top5 / max(count, 1), "tokens": count}
