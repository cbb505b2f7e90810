"""T5's span corruption (Raffel et al. 2020, §3.1.4): drop random spans of a block of tokens, put one sentinel
in the place of each, and train an encoder-decoder to write the dropped spans after their sentinels.

Ported from the T5 codebase (google-research/text-to-text-transfer-transformer, t5/data/preprocessors.py:
`random_spans_noise_mask`, `noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel` and
`random_spans_helper`), TensorFlow ops replaced by numpy ones step for step. Hand-written rather than taken from a
library because no maintained PyTorch library ships it: transformers keeps a copy only in a Flax example script.

- **The mask.** Of a block of `length` tokens, `round(length x noise_density)` are noise, in
  `round(noise / mean_noise_span_length)` spans; noise and non-noise spans alternate, beginning with non-noise
  (so the block always ends with noise), and every mask with those counts is equally likely.
- **Inputs**: each noise span becomes one sentinel, `<extra_id_0>`, `<extra_id_1>`, ... in order, then EOS.
- **Targets**: each non-noise span becomes that sentinel, so the targets read `<extra_id_0> span 1
  <extra_id_1> span 2 ... EOS`; the loss covers every target token.
- **Lengths**: a model of encoder length `context` reads raw blocks of `tokens_length(context)` tokens, the
  longest whose inputs (sentinels and EOS included) fit in `context` (`random_spans_helper`): 141 for 128.
- **Sentinels**: `add_sentinels` appends `<extra_id_N>` ... `<extra_id_0>` to the tokenizer as special tokens,
  so that `<extra_id_0>` is the last id, as in T5's vocabulary (100 of them, T5's `extra_ids`, or as many as the
  longest block needs).

Used by pretrain (objective `span_corruption`), evaluate and finetune (the forgetting perplexity and replay of
an encoder-decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
T5_EXTRA_IDS = 100  # T5's vocabulary reserves 100 sentinels
NOISE_DENSITY = 0.15  # T5's defaults (Raffel et al. 2020, Table 7's chosen setting)
MEAN_NOISE_SPAN_LENGTH = 3.0


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def random_spans_noise_mask(length: int, noise_density: float, rng: np.random.Generator,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
    """T5's `random_spans_noise_mask` (random_roll False): a boolean noise mask of shape [length].

    One guard T5's code lacks: never more spans than non-noise tokens (T5 would fail to segment them; with
    noise_density <= 0.5 it can only happen by one token of rounding)."""
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    orig_length = length
    length = max(length, 2)  # increase length to avoid degeneracy
    num_noise_tokens = int(np.round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)  # positive numbers of noise and non-noise tokens
    num_noise_spans = int(np.round(num_noise_tokens / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)  # a positive number of noise spans
    num_nonnoise_tokens = length - num_noise_tokens
    num_noise_spans = min(num_noise_spans, num_nonnoise_tokens)
    noise_span_lengths = random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_span_lengths = random_segmentation(num_nonnoise_tokens, num_noise_spans, rng)
    interleaved_span_lengths = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros(length, dtype=np.int64)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)
    is_noise = span_num % 2 == 1
    return is_noise[:orig_length]


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """T5's `_random_segmentation`: `num_items` split at random into `num_segments` non-empty segments; their
    lengths, in order (every split equally likely: a shuffle of the segment starts)."""
    first_in_segment = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
    rng.shuffle(first_in_segment)
    first_in_segment = np.pad(first_in_segment, [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)  # tf.math.segment_sum of ones


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: list[int]) -> np.ndarray:
    """T5's `noise_span_to_unique_sentinel`: each run of noise tokens replaced by the next sentinel
    (`sentinels[k]`: the k-th span's, `<extra_id_k>`)."""
    prev_token_is_noise = np.pad(noise_mask[:-1], [[1, 0]])
    first_noise_tokens = noise_mask & ~prev_token_is_noise
    subsequent_noise_tokens = noise_mask & prev_token_is_noise
    span = np.cumsum(first_noise_tokens) - 1
    if first_noise_tokens.any() and span.max() >= len(sentinels):
        raise ValueError(f"span corruption needs {span.max() + 1} sentinels for a block of {len(tokens)} tokens, "
                         f"and the tokenizer has {len(sentinels)}")
    lookup = np.asarray(sentinels, dtype=np.int64)
    out = np.where(first_noise_tokens, lookup[np.clip(span, 0, None)] if len(lookup) else 0, tokens)
    return out[~subsequent_noise_tokens]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: list[int]) -> np.ndarray:
    """T5's `nonnoise_span_to_unique_sentinel`: the targets, each run of kept tokens replaced by a sentinel."""
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinels)


def corrupt(tokens, noise_mask: np.ndarray, sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one block under a noise mask, each ending with EOS (T5's output features add it)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, sentinels).tolist() + [eos]
    targets = nonnoise_span_to_unique_sentinel(tokens, noise_mask, sentinels).tolist() + [eos]
    return inputs, targets


def uncorrupt(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """The block that `corrupt` turned into (inputs, targets): each sentinel of the inputs replaced by the span
    that follows it in the targets (the check that nothing was lost)."""
    index = {s: k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1] if targets and targets[-1] == eos else targets:
        if t in index:
            current = index[t]
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs[:-1] if inputs and inputs[-1] == eos else inputs:
        out += spans.get(index[t], []) if t in index else [t]
    return out


def _lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    # inputs: every non-noise token, a sentinel per noise span, one EOS; targets: the converse
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def random_spans_helper(inputs_length: int, noise_density: float = NOISE_DENSITY,
                        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """T5's `random_spans_helper` (one sentinel per span in inputs and targets): (raw tokens per block, targets
    length) such that the corrupted inputs, EOS included, fill `inputs_length` without padding."""
    tokens_length = inputs_length - 1
    while _lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _lengths(tokens_length, noise_density, mean_noise_span_length)
    # T5's minor hack: the targets no longer than the inputs, which are more likely a round number
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def sentinels_needed(tokens_length: int, noise_density: float = NOISE_DENSITY,
                     mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
    """Noise spans in a block of `tokens_length` tokens (the mask's count; at least one)."""
    noise = min(max(int(np.round(max(tokens_length, 2) * noise_density)), 1), max(tokens_length, 2) - 1)
    return max(int(np.round(noise / mean_noise_span_length)), 1)


def add_sentinels(tokenizer, count: int = T5_EXTRA_IDS) -> list[int]:
    """Make sure the tokenizer has `<extra_id_0>` ... `<extra_id_{count-1}>` (added as special tokens, the highest
    first so that `<extra_id_0>` is the last id, as in T5); return their ids, `<extra_id_0>`'s first."""
    missing = [sentinel_token(i) for i in reversed(range(count)) if sentinel_token(i) not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing} if _has_additional(tokenizer)
                                     else {"extra_special_tokens": missing})
    return sentinel_ids(tokenizer)


def _has_additional(tokenizer) -> bool:
    """transformers 4 names the list of extra special tokens `additional_special_tokens`, 5 `extra_special_tokens`."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of `<extra_id_0>`, `<extra_id_1>`, ... that the tokenizer has (in order, until the first missing)."""
    vocab = tokenizer.get_vocab()
    out = []
    while sentinel_token(len(out)) in vocab:
        out.append(vocab[sentinel_token(len(out))])
    return out


@dataclass
class SpanCorruption:
    """Blocks of tokens to padded encoder-decoder batches, masks drawn from a seeded generator."""

    sentinels: list[int]
    eos: int
    pad: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
    seed: int = 0

    def __post_init__(self):
        if not self.sentinels:
            raise ValueError("span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the "
                             "tokenizer (components/lib/span_corruption.add_sentinels adds them)")
        self.reseed(self.seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def pair(self, block) -> tuple[list[int], list[int]]:
        """(inputs, targets) of one block of raw tokens."""
        mask = random_spans_noise_mask(len(block), self.noise_density, self.rng, self.mean_noise_span_length)
        return corrupt(block, mask, self.sentinels, self.eos)

    def __call__(self, blocks) -> dict[str, torch.Tensor]:
        """`blocks`: token lists, or a tensor of them (pads, when `pad` is given, are stripped from the end)."""
        if torch.is_tensor(blocks):
            blocks = [strip_padding(row, self.pad) for row in blocks.detach().cpu().tolist()]
        return collate_pairs([self.pair(b) for b in blocks], self.pad)


def strip_padding(row: list[int], pad: int) -> list[int]:
    end = len(row)
    while end and row[end - 1] == pad:
        end -= 1
    return row[:end]


def collate_pairs(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded encoder inputs with their attention mask, and decoder labels (-100 where padded): what
    T5ForConditionalGeneration takes (it shifts the labels right itself to make the decoder's inputs)."""
    width = max(len(x) for x, _ in pairs)
    target_width = max(len(y) for _, y in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), target_width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def for_tokenizer(tokenizer, seed: int = 0, noise_density: float = NOISE_DENSITY,
                  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> SpanCorruption:
    """The corruption of blocks for a model with this tokenizer (its sentinels, EOS and pad)."""
    from components.lib.text import pad_token

    return SpanCorruption(sentinel_ids(tokenizer), tokenizer.eos_token_id, pad_token(tokenizer), noise_density,
                          mean_noise_span_length, seed)


@torch.inference_mode()
def score_blocks(model, tokenizer, token_blocks: list[list[int]], batch_size: int, seed: int = 0):
    """Scores (lib/scoring.py) of the target tokens of span-corrupted blocks: the same masks for the same seed,
    so rounds and models compare."""
    from components.lib.models import evaluating
    from components.lib.scoring import Scores, batch_scores

    corruption = for_tokenizer(tokenizer, seed)
    device = next(model.parameters()).device
    total = Scores()
    with evaluating(model):
        for i in range(0, len(token_blocks), batch_size):
            batch = {k: v.to(device) for k, v in corruption(token_blocks[i:i + batch_size]).items()}
            total = total + batch_scores(model(**batch).logits, batch["labels"])
    return total


def tokens_length(context: int, noise_density: float = NOISE_DENSITY,
                  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
    """Raw tokens per block for an encoder of length `context` (`random_spans_helper`)."""
    return random_spans_helper(context, noise_density, mean_noise_span_length)[0]


def sentinel_count(context: int, noise_density: float = NOISE_DENSITY,
                   mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
    """Sentinels a model of encoder length `context` needs: T5's 100, or more for a longer block."""
    return max(T5_EXTRA_IDS, sentinels_needed(tokens_length(context, noise_density, mean_noise_span_length),
                                              noise_density, mean_noise_span_length))
