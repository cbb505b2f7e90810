"""Packed sequences: several examples in one row, each attending only to itself (no padding computed).

A packed row concatenates examples and restarts `position_ids` at 0 for each; it is passed with
`attention_mask=None` and `use_cache=False`, which makes transformers' mask builder (`masking_utils.find_packed_sequence_indices`)
read the example boundaries from the positions and build a block-diagonal causal mask (the sdpa and eager
kernels), or take the varlen path (flash-attention). This is how TRL's `padding_free` batches reach the model.

Two placements (`packing.strategy`):
- `padding_free`: each batch's examples are packed into as few rows of `length` tokens as fit (default: the
  data's `max_length`). The batch holds the same examples
  as without packing, so the step's loss (the mean over its label tokens) and gradient are the same; only the
  padding is gone.
- `bfd` (finetune): the whole training set is packed once into rows of `length` tokens, and `batch_size`
  counts rows, as TRL's `packing=True` with `packing_strategy="bfd"`.

Both place examples with best-fit decreasing (Johnson 1973): sort by length, longest first; put each example in
the open row whose free space is smallest among those it fits in, else open a new row. It is within 11/9 of
the optimal number of rows, and O(n log n) here with a sorted list of free spaces. No library offers it
outside a trainer (TRL's lives inside its dataset preparation), hence these few lines.

At an example boundary the first token of an example would be "predicted" from the previous example's last
token; those positions are never targets: the first label of each example is set to -100 (without packing
the first token of a row is never a target either, since the labels are shifted).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

IGNORE = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` (an item longer than it gets a bin alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max(0, capacity - n), len(bins) - 1))
    return bins


def padding_share(lengths: Sequence[int], batch_size: int) -> float:
    """The share of a right-padded batch's positions that are padding, over the data in order of batches."""
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / max(padded, 1)


def pack(sequences: list[dict[str, list[int]]], capacity: int | None, pad_id: int,
         fill: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Pack sequences (dicts of equal-length id lists, `input_ids` among them) into rows of at most `capacity`
    tokens by best-fit decreasing (None: all in one row); see `pack_groups` for what comes back."""
    lengths = [len(s["input_ids"]) for s in sequences]
    return pack_groups(sequences, best_fit_decreasing(lengths, capacity or sum(lengths)), pad_id, fill)


def pack_groups(sequences: list[dict[str, list[int]]], groups: list[list[int]], pad_id: int,
                fill: dict[str, int] | None = None, width: int = 0) -> dict[str, torch.Tensor]:
    """One row per group of sequence indices, right-padded to the longest row (or to `width` when longer).

    Returns the sequences' lists as (rows, width) tensors plus `position_ids` (restarting per sequence; the
    padding is one more "sequence" of its own, so it attends to nothing real), `sequence_index` (the sequence
    each position belongs to, -1 for padding) and `last_index` (row, column of each sequence's last token).
    `fill`: the padding value of each other key (default 0); `labels` also get -100 at each sequence's first
    token, and any `*_mask` key 0 there: those positions would be predicted across a boundary.
    """
    fill = {"input_ids": pad_id, "labels": IGNORE, **(fill or {})}
    lengths = [len(s["input_ids"]) for s in sequences]
    width = max(width, max(sum(lengths[i] for i in g) for g in groups))
    out = {k: torch.full((len(groups), width), fill.get(k, 0), dtype=torch.long) for k in sequences[0]}
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    index = torch.full((len(groups), width), -1, dtype=torch.long)
    last = torch.zeros((len(sequences), 2), dtype=torch.long)
    for r, group in enumerate(groups):
        col = 0
        for i in sorted(group):  # in data order within a row
            n = lengths[i]
            for k, values in sequences[i].items():
                out[k][r, col:col + n] = torch.as_tensor(values)
                if k == "labels":
                    out[k][r, col] = IGNORE
                elif k.endswith("_mask"):
                    out[k][r, col] = 0
            positions[r, col:col + n] = torch.arange(n)
            index[r, col:col + n] = i
            last[i, 0], last[i, 1] = r, col + n - 1
            col += n
        positions[r, col:] = torch.arange(width - col)
    return {**out, "position_ids": positions, "sequence_index": index, "last_index": last}


def collate_sft(batch: list[tuple[list[int], list[int]]], pad_id: int, capacity: int | None) -> dict:
    """A padding-free batch of (input ids, labels) examples."""
    return pack([{"input_ids": ids, "labels": labels} for ids, labels in batch], capacity, pad_id)


def collate_sft_rows(rows: list[list[tuple[list[int], list[int]]]], pad_id: int, width: int) -> dict:
    """A batch of rows already packed (`bfd`): each row a list of (input ids, labels) examples, padded to
    `width` tokens, so every batch has one shape (what a compiled model wants)."""
    flat = [{"input_ids": ids, "labels": labels} for row in rows for ids, labels in row]
    groups, start = [], 0
    for row in rows:
        groups.append(list(range(start, start + len(row))))
        start += len(row)
    return pack_groups(flat, groups, pad_id, width=width)


def bfd_rows(examples: list[tuple[list[int], list[int]]], capacity: int) -> list[list[tuple[list[int], list[int]]]]:
    """The training examples packed once into rows of at most `capacity` tokens (best-fit decreasing)."""
    groups = best_fit_decreasing([len(ids) for ids, _ in examples], capacity)
    return [[examples[i] for i in sorted(g)] for g in groups]


def collate_pairs(items: list[dict], pad_id: int, capacity: int | None) -> dict:
    """A padding-free batch of preference pairs: the chosen replies are sequences 0..n-1, the rejected ones
    n..2n-1 (the order of `preferences.collate_pairs`), with their completion masks and soft labels."""
    seqs = [{"input_ids": ids, "completion_mask": mask} for side in ("chosen", "rejected")
            for ids, mask in (it[side] for it in items)]
    return {**pack(seqs, capacity, pad_id), "score": torch.tensor([it["score"] for it in items])}


def pair_collate(spec, pad_id: int):
    """The collate function of a pair-training step (reward_model, dpo): padded, or packed per `spec.packing`
    into rows of `packing.length` tokens (default: the data's `max_length`)."""
    from components.lib.preferences import collate_pairs as padded

    p = spec.packing_spec()
    if p is None:
        return lambda items: padded(items, pad_id)
    return lambda items: collate_pairs(items, pad_id, p.length or spec.data.max_length)


def per_sequence_sum(values: torch.Tensor, sequence_index: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of `values` (rows, width) over each sequence's positions: (count,)."""
    keep = sequence_index >= 0
    out = torch.zeros(count, dtype=values.dtype, device=values.device)
    return out.index_add(0, sequence_index[keep], values[keep])


def at_last_tokens(values: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """`values` (rows, width) read at each sequence's last token: (sequences,)."""
    return values[last_index[:, 0], last_index[:, 1]]


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch, packed or padded."""
    if "sequence_index" in batch:
        return int((batch["sequence_index"] >= 0).sum())
    return int(batch["attention_mask"].sum())


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a transformers causal LM takes from a batch (a packed one has no attention mask: the positions
    say where each example starts). No cache: transformers reads the boundaries from the positions only when
    the forward pass has none."""
    return {**{k: batch[k] for k in MODEL_KEYS if k in batch}, "use_cache": False}


def check_packable(model) -> None:
    """Packing needs a model whose attention masks are built from the positions (transformers' mask builder);
    llmcycle's pre-transformer families would carry one example's state into the next. (Prompt tuning, which
    prepends virtual tokens to every row, is refused by the spec.)"""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    if config.model_type.startswith("llmcycle_"):
        raise ValueError(f"packing: a {config.model_type} model carries state from one example to the next; "
                         "packing needs a transformer (set packing: false)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("packing: encoder-decoder models are not packed (set packing: false)")
