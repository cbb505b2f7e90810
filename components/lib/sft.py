"""Supervised fine-tuning: instruction rows, their tokens, and the training loop (finetune, constitutional SL-CAI).

Rows are TRL's formats, `{prompt, completion}` or `{messages: [...]}` (components/lib/text.py renders chats);
the loss covers the completion tokens only (the prompt and padding are -100), and every completion ends with
EOS, as in TRL's SFTTrainer with completion-only loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from components.lib.io import read_jsonl, read_jsonl_files, split_rows
from components.lib.text import encode_completion, prompt_completion
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     sum_over_ranks, total_steps)
from schemas.base import TrainingLoop
from schemas.data import SftDataSpec
from schemas.peft import PeftSpec

IGNORE = -100


def load_rows(data: SftDataSpec, seed: int, resolve: Callable[[str], Path],
              step_data: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for a `data:` section; `step_data` is the data folder of `data.step`."""
    if data.builtin == "tasks":
        from components.lib.tasks import make_examples

        return (make_examples(seed, "train", data.n_per_task, data.tasks),
                make_examples(seed, "eval", data.eval_per_task, data.tasks))
    if data.files is not None:
        rows = read_jsonl_files(data.files, resolve, "data.files")
        if data.eval_files:
            return rows, read_jsonl_files(data.eval_files, resolve, "data.eval_files")
        return split_rows(rows, data.eval_fraction, seed)
    path = Path(step_data) / "sft.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"data.step: step '{data.step}' wrote no sft.jsonl in its data output ({path.parent})")
    return split_rows(read_jsonl(path), data.eval_fraction, seed)


def encode_rows(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row, the prompt masked with -100."""
    out = []
    for row in rows:
        prompt, completion = encode_completion(tokenizer, *prompt_completion(row, tokenizer), max_length)
        out.append((prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


def replay_blocks(token_dir: Path, count: int, length: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """`count` random blocks of pretraining tokens (train split), every token a label."""
    from components.lib.tokens import read_tokens

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


class SftModule(L.LightningModule):
    """Next-token loss on completion tokens (labels are -100 elsewhere) of a transformers/peft model."""

    def __init__(self, model: torch.nn.Module, optimizer: dict | None = None, schedule: dict | None = None,
                 total_steps: int = 100):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.tokens_in_batch = 0
        self._val_sum, self._val_count = 0.0, 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = int(batch["attention_mask"].sum())
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model(**batch).loss
        targets = int((batch["labels"][:, 1:] != IGNORE).sum())
        self._val_sum, self._val_count = self._val_sum + float(loss) * targets, self._val_count + targets

    def on_validation_epoch_end(self) -> None:
        from components.lib.scoring import perplexity

        total, count = sum_over_ranks(self, self._val_sum, self._val_count)  # each rank scored its share
        if count:
            self.log_dict({"val/loss": total / count, "val/perplexity": perplexity(total, count)}, prog_bar=True)
        self._val_sum, self._val_count = 0.0, 0

    def configure_optimizers(self) -> dict:
        return configure_optimizer(self.model.named_parameters(), self.hparams.optimizer or {},
                                   self.hparams.schedule or {}, self.hparams.total_steps)


@dataclass
class SftResult:
    """The trained model (a PeftModel for adapter methods) and what training measured."""

    model: Any
    metrics: dict[str, float] = field(default_factory=dict)


def train_sft(ctx, model, tokenizer, train_rows: list[dict], eval_rows: list[dict], peft: PeftSpec,
              loop: TrainingLoop, max_length: int, extra: list | None = None) -> SftResult:
    """Fine-tune `model` on rows with `peft` and the loop settings; `extra` are encoded examples to mix in
    (replay blocks). Metrics: `params/*`, `train/loss`, `train/steps`, `val/loss`, `val/perplexity`, `perf/*`."""
    from components.lib.peft import apply_peft

    train = encode_rows(train_rows, tokenizer, max_length) + list(extra or [])
    val = encode_rows(eval_rows, tokenizer, max_length)
    model = apply_peft(model, peft, tokenizer)
    trainable, total = count_parameters(model)
    print(f"{ctx.name}: peft {peft.method}: {trainable:,} trainable of {total:,} parameters "
          f"({trainable / total:.2%}); {len(train)} training and {len(val)} held-out examples", flush=True)
    mean_length = sum(len(ids) for ids, _ in train) / max(1, len(train))
    steps = total_steps(loop, int(loop.batch_size * loop.accumulate * mean_length))
    module = SftModule(model, loop.optimizer.model_dump(), loop.schedule.model_dump(), steps)
    data = SftDataModule(train, val, tokenizer.pad_token_id, loop.batch_size, ctx.seed)
    trainer = make_trainer(ctx, loop, steps, params=total, validate=bool(val))
    fit(trainer, module, datamodule=data, ctx=ctx)
    metrics = {"params/trainable": trainable, "params/total": total, "params/trainable_fraction": trainable / total,
               "train/steps": trainer.global_step, **perf_metrics(trainer)}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k in
                    ("train/loss", "val/loss", "val/perplexity")})
    return SftResult(module.model.float(), metrics)
