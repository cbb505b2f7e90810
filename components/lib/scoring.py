"""Scoring a language model on held-out tokens: one definition of perplexity, one way to cut text into windows.

**Perplexity** = exp(mean negative log-likelihood per predicted token): `perplexity(nll, count)`.

**Causal models** score *documents*. A document is its tokens followed by the EOS that ends it (token files
store documents that way; `document_ids` encodes texts the same way). Each document is predicted after the
start token (`text.start_token`: the BOS, which for llmcycle's tokenizers is `</s>`, the token training puts
before every document), in disjoint windows of at most `context` tokens where a later window keeps the
tokens before it as context: lm-evaluation-harness's `loglikelihood_rolling` windows, so every token of a
document is predicted exactly once and the same model gives the same log-likelihood in both.

**Masked models** score consecutive blocks of `context` tokens (the last one shorter), 15% of the non-special
tokens masked BERT's way with a fixed seed, and predict the masked ones.

**Encoder-decoders** score consecutive blocks under T5's span corruption with a fixed seed, and predict the
targets (components/lib/span_corruption.py, components/lib/seq2seq.py).

Used by pretrain's validation, evaluate, finetune's forgetting report, optimize and monitor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from components.lib.models import evaluating

IGNORE = -100


def perplexity(nll: float, count: int = 1) -> float:
    """exp(nll / count): the perplexity of `count` predicted tokens whose negative log-likelihoods sum to `nll`
    (with the default count 1, of a mean loss)."""
    return math.exp(min(nll / count, 50.0)) if count else float("nan")


@dataclass
class Window:
    """One forward pass: `input_ids`, whose last len(targets) positions predict `targets`."""

    input_ids: list[int]
    targets: list[int]


def rolling_windows(tokens: list[int], start: int, context: int) -> list[Window]:
    """The windows that predict every token of one document once (lm-eval's rolling windows, context_len 1).

    The first window reads `start` then the first tokens; each later window predicts up to `context` new
    tokens and reads the `context` tokens just before its last one.
    """
    if not tokens:
        return []
    first = min(context, len(tokens))
    windows = [Window([start] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + context)
        windows.append(Window(tokens[end - context - 1:end - 1], tokens[done:end]))
        done = end
    return windows


def documents(stream: np.ndarray, eos: int) -> Iterator[list[int]]:
    """The documents of a token stream: each up to and including its EOS (a trailing rest without one, too)."""
    start = 0
    for end in np.flatnonzero(np.asarray(stream) == eos):
        yield np.asarray(stream[start:end + 1], dtype=np.int64).tolist()
        start = end + 1
    if start < len(stream):
        yield np.asarray(stream[start:], dtype=np.int64).tolist()


def document_ids(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Texts as documents: their tokens and an EOS each, as `tokenize` writes them into token files."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def document_windows(docs: Iterable[list[int]], start: int, context: int, limit: int | None = None) -> list[Window]:
    """Every document's rolling windows in order, the first `limit` of them when a limit is given."""
    out: list[Window] = []
    for doc in docs:
        for window in rolling_windows(doc, start, context):
            if limit is not None and len(out) >= limit:
                return out
            out.append(window)
    return out


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over the list (all of them when there are fewer), so a sample covers it end to end."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]


def collate_windows(windows: list[Window], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, and labels aligned with the logits (-100 where not scored)."""
    width = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        ids[i, :n] = torch.tensor(w.input_ids)
        mask[i, :n] = 1
        labels[i, n - len(w.targets):n] = torch.tensor(w.targets)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class Scores:
    """Summed negative log-likelihood, predicted tokens, and how often the target was the top-1 / in the top-5."""

    nll: float = 0.0
    count: int = 0
    top1: int = 0
    top5: int = 0

    def __add__(self, other: "Scores") -> "Scores":
        return Scores(self.nll + other.nll, self.count + other.count, self.top1 + other.top1, self.top5 + other.top5)

    @property
    def loss(self) -> float:
        return self.nll / self.count if self.count else float("nan")

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.count)

    def metrics(self, masked: bool = False, objective: str | None = None) -> dict[str, float]:
        """`loss`, `perplexity`, `tokens` and the top-1/top-5 rates (`masked_*` for a masked model, `span_*` for the
        targets of span corruption: objective `span_corruption`)."""
        top1, top5 = ("span_top1", "span_top5") if objective == "span_corruption" else \
            ("masked_accuracy", "masked_top5") if masked else ("next_token_top1", "next_token_top5")
        n = max(self.count, 1)
        return {"loss": self.loss, "perplexity": perplexity(self.nll, self.count), top1: self.top1 / n,
                top5: self.top5 / n, "tokens": float(self.count)}


def batch_scores(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Scores of the positions whose label is not -100 (logits and labels aligned, as `collate_windows` makes)."""
    chosen = labels != IGNORE
    logits, target = logits[chosen].float(), labels[chosen]
    if target.numel() == 0:
        return Scores()
    nll = float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return Scores(nll, int(target.numel()), int((best[:, 0] == target).sum()), int((best == target[:, None]).any(-1).sum()))


@torch.inference_mode()
def score_windows(model, windows: list[Window], batch_size: int, pad_id: int) -> Scores:
    """Score a causal model on windows, `batch_size` at a time."""
    device = next(model.parameters()).device
    total = Scores()
    with evaluating(model):
        for i in range(0, len(windows), batch_size):
            batch = {k: v.to(device) for k, v in collate_windows(windows[i:i + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # A prompt-tuned model puts its virtual tokens before the input: score the input's positions.
            total = total + batch_scores(logits[:, -batch["labels"].shape[1]:], batch["labels"])
    return total


def heldout_windows(token_dir, tokenizer, context: int, limit: int | None, split: str = "val") -> list[Window]:
    """The first `limit` windows of the documents of a tokenize step's token file (`val`: its held-out split)."""
    from pathlib import Path

    from components.lib.text import start_token
    from components.lib.tokens import read_tokens

    stream = read_tokens(Path(token_dir), split)
    if len(stream) == 0:
        raise ValueError(f"{token_dir}: the '{split}' token file is empty (for 'val': no document was held out; raise "
                         "the tokenize step's val_fraction or give it more documents)")
    return document_windows(documents(stream, tokenizer.eos_token_id), start_token(tokenizer), context, limit)


def score_documents(model, docs: Iterable[list[int]], start: int, pad_id: int, context: int, batch_size: int = 8,
                    limit: int | None = None) -> Scores:
    """Score documents (token lists ending with EOS) in rolling windows; the first `limit` windows if given."""
    return score_windows(model, document_windows(docs, start, context, limit), batch_size, pad_id)


# -- masked models ---------------------------------------------------------------------------------


def make_collator(tokenizer, probability: float = 0.15, seed: int = 0):
    """transformers' MLM collator with its own seeded generator (so masking never draws from the global RNG)."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability)
    collator.generator = torch.Generator().manual_seed(seed)
    return collator


def mask_tokens(collator, ids: torch.Tensor, special_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of BERT masking; special tokens (EOS between documents, pads) are never selected."""
    special = torch.isin(ids, special_ids)
    inputs, labels = collator.torch_mask_tokens(ids.detach().cpu().clone(), special_tokens_mask=special.cpu())
    return inputs.to(ids.device), labels.to(ids.device)


def blocks(stream: np.ndarray, context: int, limit: int | None = None) -> list[list[int]]:
    """Consecutive blocks of `context` tokens, the last one shorter (every token in one block)."""
    n = len(stream)
    starts = range(0, n, context)
    return [np.asarray(stream[s:s + context], dtype=np.int64).tolist() for s in list(starts)[:limit]]


def masked_batch_scores(model, collator, ids: torch.Tensor, special_ids: torch.Tensor, pad_id: int) -> Scores:
    """Mask a padded batch of blocks (pads are special, so never masked) and score the masked tokens."""
    attention = (ids != pad_id).long()
    inputs, labels = mask_tokens(collator, ids, special_ids)
    return batch_scores(model(input_ids=inputs, attention_mask=attention).logits, labels)


def pad_blocks(token_blocks: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, token_blocks))
    return torch.tensor([b + [pad_id] * (width - len(b)) for b in token_blocks])


@torch.inference_mode()
def score_masked(model, tokenizer, token_blocks: list[list[int]], batch_size: int, probability: float = 0.15,
                 seed: int = 0) -> Scores:
    """Masked-token scores on blocks: the same masks for the same seed, so rounds and models compare."""
    from components.lib.text import pad_token

    collator = make_collator(tokenizer, probability, seed)
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    device = next(model.parameters()).device
    total = Scores()
    with evaluating(model):
        for i in range(0, len(token_blocks), batch_size):
            ids = pad_blocks(token_blocks[i:i + batch_size], pad_token(tokenizer)).to(device)
            total = total + masked_batch_scores(model, collator, ids, special.to(device), pad_token(tokenizer))
    return total
