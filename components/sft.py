"""Instruction data for fine-tuning: rows from JSONL, the builtin task mixture or another step, tokenized
into batches whose labels cover the completion only (prompt and padding are -100).

Row formats are TRL's: `{prompt, completion}`, or `{messages: [{role, content}, ...]}` whose last message
(the assistant's) is the completion and the rest, rendered with the tokenizer's chat template (or
`DEFAULT_TEMPLATE` where it has none), the prompt. Every completion is followed by EOS, as in TRL.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from components.context import StepContext
from components.jsonl import iter_lines
from schemas.steps.finetune import SftDataSpec

IGNORE = -100
DEFAULT_TEMPLATE = "{role}: {content}\n"  # for tokenizers without a chat template; the prompt ends "assistant:"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file, each tagged with `_where` (file:line) for error messages."""
    rows = []
    for n, row, error in iter_lines(path):
        if error:
            raise ValueError(f"{path}:{n}: {error}")
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append({**row, "_where": f"{path}:{n}"})
    return rows


def read_globs(patterns: list[str], ctx: StepContext, field: str) -> list[dict]:
    """Rows of every JSONL file the globs match (relative to the spec); an error names an empty glob."""
    rows: list[dict] = []
    for pattern in patterns:
        found = sorted(glob.glob(str(ctx.resolve_path(pattern)), recursive=True))
        if not found:
            raise FileNotFoundError(f"data.{field}: no file matches '{pattern}' (relative to {ctx.base_dir})")
        for path in found:
            rows += read_jsonl(Path(path))
    return rows


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the rows by a seeded hash of their content (stable under reordering)."""
    def held(row: dict) -> bool:
        text = json.dumps({k: v for k, v in row.items() if k != "_where"}, sort_keys=True)
        return int(hashlib.sha256(f"{seed}|{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
    train = [r for r in rows if not held(r)]
    val = [r for r in rows if held(r)]
    if not val and len(rows) > 1:  # tiny files: keep at least one held-out row
        val, train = train[-1:], train[:-1]
    return train, val


def load_rows(spec: SftDataSpec, ctx: StepContext) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for a `data:` section."""
    if spec.builtin == "tasks":
        from components.tasks import make_examples

        return (make_examples(ctx.seed, "train", spec.n_per_task, spec.tasks),
                make_examples(ctx.seed, "eval", spec.eval_per_task, spec.tasks))
    if spec.files is not None:
        rows = read_globs(spec.files, ctx, "files")
        if spec.eval_files:
            return rows, read_globs(spec.eval_files, ctx, "eval_files")
        return split_rows(rows, spec.eval_fraction, ctx.seed)
    path = ctx.step(spec.step).path("data") / "sft.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"data.step: step '{spec.step}' wrote no sft.jsonl in its data output ({path.parent})")
    return split_rows(read_jsonl(path), spec.eval_fraction, ctx.seed)


def to_prompt_completion(row: dict, tokenizer) -> tuple[str, str]:
    """(prompt, completion) text of a row in either TRL format."""
    where = row.get("_where", "row")
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected {{prompt, completion}} or {{messages: [...]}}, got fields "
                         f"{', '.join(k for k in row if k != '_where') or 'none'}")
    if messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the completion), got role "
                         f"{messages[-1].get('role')!r}")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt, full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
    prompt = "".join(DEFAULT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages[:-1])
    return prompt + "assistant:", " " + messages[-1]["content"]


def encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt masked; cut the prompt from the left, then the completion."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not c or c[-1] != tokenizer.eos_token_id):
        c = c + [tokenizer.eos_token_id]
    c = c[:max_length]
    p = p[max(0, len(p) - (max_length - len(c))):] if max_length > len(c) else []
    return p + c, [IGNORE] * len(p) + c


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Encode rows of either format."""
    return [encode(tokenizer, *to_prompt_completion(r, tokenizer), max_length) for r in rows]


def replay_blocks(token_dir: Path, count: int, length: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """`count` random blocks of pretraining tokens (train split), every token a label."""
    from components.data import read_tokens

    tokens = read_tokens(Path(token_dir), "train")
    if len(tokens) <= length:
        raise ValueError(f"replay: the token files in {token_dir} hold fewer than {length + 1} training tokens")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length, size=count)
    return [(ids, list(ids)) for ids in (tokens[s:s + length].astype(np.int64).tolist() for s in starts)]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SftDataModule(L.LightningDataModule):
    """Shuffled (seeded) training examples and held-out examples in order, as padded batches."""

    def __init__(self, train: list, val: list, pad_id: int, batch_size: int = 16, seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["train", "val"])
        self.train, self.val = train, val
        if not train:
            raise ValueError("fine-tuning data has no training rows")

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=shuffle, generator=gen,
                          drop_last=shuffle and len(data) >= self.hparams.batch_size,
                          collate_fn=lambda b: collate(b, self.hparams.pad_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, False)


def mean_length(examples: list) -> float:
    """Average tokens per example (to turn max_tokens into steps)."""
    return sum(len(ids) for ids, _ in examples) / max(1, len(examples))


def shuffle_seeded(items: list, seed: int) -> list:
    """A seeded shuffled copy."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
