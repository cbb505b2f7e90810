"""The token files that `tokenize` writes (numpy memmaps, never loaded whole) and a Lightning DataModule over them.

Training reads shuffled consecutive blocks of the training stream (documents run into each other, separated
by EOS, as in GPT-2). Validation reads the held-out documents the way `components/lib/scoring.py` scores
them, so the `val/loss` of training and the perplexity of `evaluate` are one measurement.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

BLOCK_OBJECTIVES = ("masked", "span_corruption")  # validated on consecutive blocks the module corrupts itself


def read_tokens(folder: Path, split: str) -> np.memmap:
    meta = json.loads((folder / "meta.json").read_text())
    path = folder / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


class BlockDataset(Dataset):
    """Consecutive non-overlapping blocks of `context` tokens (the causal model shifts labels itself)."""

    def __init__(self, tokens: np.ndarray, context: int):
        self.tokens, self.context = tokens, context
        self.n = len(tokens) // context

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        block = self.tokens[i * self.context:(i + 1) * self.context]
        return torch.from_numpy(block.astype(np.int64))


class TokenDataModule(L.LightningDataModule):
    """Shuffled (seeded) training blocks; the first `val_batches` batches of held-out windows (causal: scored
    per document, `scoring.heldout_windows`; masked and span_corruption: consecutive blocks, `scoring.blocks`)."""

    def __init__(self, token_dir: str, context: int = 128, batch_size: int = 16, val_batches: int = 8,
                 seed: int = 0, objective: str = "causal", tokenizer=None, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.token_dir, self.tokenizer = Path(token_dir), tokenizer

    def setup(self, stage: str | None = None) -> None:
        from components.lib import scoring

        ctx, limit = self.hparams.context, self.hparams.val_batches * self.hparams.batch_size
        self.train_set = BlockDataset(read_tokens(self.token_dir, "train"), ctx)
        if len(self.train_set) == 0:
            raise ValueError(f"training tokens ({len(self.train_set.tokens)}) are fewer than one block of "
                             f"{ctx}; lower model.context or use a larger corpus")
        if self.hparams.objective in BLOCK_OBJECTIVES:
            self.val_set = scoring.blocks(read_tokens(self.token_dir, "val"), ctx, limit)
        else:
            self.val_set = scoring.heldout_windows(self.token_dir, self.tokenizer, ctx, limit)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=gen,
                          drop_last=len(self.train_set) >= self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        from components.lib import scoring
        from components.lib.text import pad_token

        collate = scoring.pad_blocks if self.hparams.objective in BLOCK_OBJECTIVES else scoring.collate_windows
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=functools.partial(collate, pad_id=pad_token(self.tokenizer)),
                          num_workers=self.hparams.num_workers)
