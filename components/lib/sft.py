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
from torch.utils.data import DataLoader, IterableDataset

from components.lib import packing as packing_lib
from components.lib import datasources
from components.lib.datasources import Draws
from components.lib.io import expand
from components.lib.text import encode_completion, prompt_completion
from components.lib.training import (configure_optimizer, count_parameters, fit, make_trainer, perf_metrics,
                                     sum_over_ranks, total_steps)
from schemas.base import TrainingLoop
from schemas.data import PackingSpec, SftDataSpec
from schemas.peft import PeftSpec

IGNORE = -100


def load_rows(data: SftDataSpec, seed: int, resolve: Callable[[str], Path],
              step_data: Path | Callable[[str], Path] | None = None) -> tuple[list[dict] | Draws, list[dict]]:
    """(train rows, held-out rows) for a `data:` section; `step_data`: the data folder of `data.step`, or a
    function giving each step's (a mixture may read several). The training rows are a list (for a mixture, its
    drawn pass: `datasources.MixedRows`), or endless `datasources.Draws` when a source is streamed; a mixture's
    held-out rows are every source's own, concatenated."""
    folder = step_data if callable(step_data) else (lambda name: step_data)
    entries = data.mixture or [data]
    sources = [datasources.Source(e.source_name() if data.mixture else "data", getattr(e, "weight", 1.0),
                                  *_source_rows(e, data, seed, resolve, folder,
                                                f"data.mixture[{i}]" if data.mixture else "data"))
               for i, e in enumerate(entries)]
    return (datasources.training_rows(sources, seed, data.mixture_size, mixed=data.mixture is not None),
            datasources.held_rows(sources))


def _source_rows(source, data: SftDataSpec, seed: int, resolve: Callable[[str], Path],
                 folder: Callable[[str], Path], field: str) -> tuple[list[dict] | datasources.JsonlStream, list[dict]]:
    """(training, held-out) rows of one source: the builtin tasks, JSONL files, or a step's sft.jsonl."""
    if source.builtin == "tasks":
        from components.lib.tasks import make_examples

        return (make_examples(seed, "train", source.n_per_task, source.tasks),
                make_examples(seed, "eval", source.eval_per_task, source.tasks))
    if source.files is not None:
        paths = expand(source.files, resolve, f"{field}.files")
        evals = expand(source.eval_files, resolve, f"{field}.eval_files") if source.eval_files else []
    else:
        path = Path(folder(source.step)) / "sft.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{field}.step: step '{source.step}' wrote no sft.jsonl in its data output "
                                    f"({path.parent})")
        paths, evals = [path], []
    return datasources.file_source(paths, evals, data.eval_fraction, seed, data.stream, field)


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
    """Shuffled (seeded) training examples and held-out examples in order, as padded or packed batches.

    `packing` (components/lib/packing.py): `padding_free` packs each batch's examples into rows of at most
    `length` tokens; `bfd` packs the training set once into rows of `length` tokens and batches rows. Held-out
    batches are packed padding-free either way (the same examples per batch, so the same mean loss)."""

    def __init__(self, train: list, val: list, pad_id: int, batch_size: int = 16, seed: int = 0,
                 packing: PackingSpec | None = None, max_length: int = 256):
        super().__init__()
        self.save_hyperparameters(ignore=["train", "val", "packing"])
        self.packing = packing
        if not train:
            raise ValueError("fine-tuning data has no training rows")
        if packing is not None and packing.strategy == "bfd":
            if isinstance(train, IterableDataset):
                raise ValueError("packing.strategy bfd packs the whole training set once, and the data is streamed "
                                 "(data.stream): use padding_free, or data.stream: false")
            train = packing_lib.bfd_rows(train, packing.length or max_length)
        self.train, self.val = train, val

    def _collate(self, train: bool):
        pad, p = self.hparams.pad_id, self.packing
        if p is None:
            return lambda b: collate(b, pad)
        if train and p.strategy == "bfd":
            return lambda rows: packing_lib.collate_sft_rows(rows, pad, p.length or self.hparams.max_length)
        return lambda b: packing_lib.collate_sft(b, pad, p.length or self.hparams.max_length)

    def _loader(self, data: list, shuffle: bool) -> DataLoader:
        if isinstance(data, IterableDataset):  # streamed rows come shuffled, endlessly (components/lib/datasources.py)
            return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=self._collate(train=True))
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=shuffle, generator=gen,
                          drop_last=shuffle and len(data) >= self.hparams.batch_size,
                          collate_fn=self._collate(train=shuffle))

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

    @staticmethod
    def inputs(batch: dict) -> dict:
        """What the model takes from a batch (padded or packed)."""
        return packing_lib.model_inputs(batch)

    @staticmethod
    def real_tokens(batch: dict) -> int:
        """The batch's non-padding tokens (for tokens/s)."""
        return packing_lib.real_tokens(batch)

    @staticmethod
    def targets(batch: dict) -> int:
        """Label tokens the loss averages over: a causal LM shifts them, so the first is never predicted."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.tokens_in_batch = self.real_tokens(batch)
        loss = self.model(**self.inputs(batch)).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model(**self.inputs(batch)).loss
        targets = self.targets(batch)
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
              loop: TrainingLoop, max_length: int, extra: list | None = None,
              packing: PackingSpec | None = None) -> SftResult:
    """Fine-tune `model` on rows with `peft` and the loop settings; `extra` are encoded examples to mix in
    (replay blocks); `packing`: several examples per row. Metrics: `params/*`, `train/loss`, `train/steps`,
    `val/loss`, `val/perplexity`, `perf/*`, and `data/padding_share` (of unpacked batches)."""
    from components.lib.peft import apply_peft

    if getattr(model.config, "is_encoder_decoder", False):  # t5: prompt to the encoder, completion from the decoder
        from components.lib import seq2seq

        if isinstance(train_rows, Draws):
            raise ValueError("streamed data (data.stream) trains decoder-only models; set data.stream: false")

        return seq2seq.train_sft(ctx, model, tokenizer, train_rows, eval_rows, peft, loop, max_length, extra, packing)

    if isinstance(train_rows, Draws):  # streamed: encoded as drawn; lengths estimated from the first rows
        if extra:
            raise ValueError("replay blocks are added to loaded rows; the data is streamed (data.stream)")
        train = datasources.EncodedStream(train_rows, lambda rows: encode_rows(rows, tokenizer, max_length))
        lengths = [len(ids) for ids, _ in train.estimate()]
    else:
        train = encode_rows(train_rows, tokenizer, max_length) + list(extra or [])
        lengths = [len(ids) for ids, _ in train]
    val = encode_rows(eval_rows, tokenizer, max_length)
    model = apply_peft(model, peft, tokenizer)
    trainable, total = count_parameters(model)
    shown = "streamed" if isinstance(train, IterableDataset) else f"{len(train)}"
    print(f"{ctx.name}: peft {peft.method}: {trainable:,} trainable of {total:,} parameters "
          f"({trainable / total:.2%}); {shown} training and {len(val)} held-out examples", flush=True)
    if packing is not None:
        packing_lib.check_packable(model)
    mean_length = sum(lengths) / max(1, len(lengths))
    data = SftDataModule(train, val, tokenizer.pad_token_id, loop.batch_size, ctx.seed, packing, max_length)
    # tokens per batch item: an example, or a bfd row
    per_batch = mean_length if isinstance(train, IterableDataset) else mean_length * (len(train) / len(data.train))
    steps = total_steps(loop, int(loop.batch_size * loop.accumulate * per_batch))
    module = SftModule(model, loop.optimizer.model_dump(), loop.schedule.model_dump(), steps)
    padding = packing_lib.padding_share(lengths, loop.batch_size)
    if packing is not None:
        print(f"{ctx.name}: packing {packing.strategy}: {shown} examples"
              + (f" in {len(data.train)} rows of {packing.length or max_length} tokens"
                 if shown != "streamed" and len(data.train) < len(train) else "")
              + f"; unpacked batches would be {padding:.0%} padding", flush=True)
    trainer = make_trainer(ctx, loop, steps, params=total, validate=bool(val))
    fit(trainer, module, datamodule=data, ctx=ctx,
        fixed_shapes=packing is not None and packing.strategy == "bfd")  # rows of packing.length tokens
    metrics = {"params/trainable": trainable, "params/total": total, "params/trainable_fraction": trainable / total,
               "train/steps": trainer.global_step, "data/padding_share": padding, **perf_metrics(trainer)}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k in
                    ("train/loss", "val/loss", "val/perplexity")})
    return SftResult(module.model.float(), metrics)
