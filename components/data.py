"""A Lightning DataModule over the token files that `tokenize` writes (numpy memmaps, never loaded whole)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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
    """Shuffled training blocks (seeded) and the first `val_batches` validation blocks, in order."""

    def __init__(self, token_dir: str, context: int = 128, batch_size: int = 16, val_batches: int = 8,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.token_dir = Path(token_dir)

    def setup(self, stage: str | None = None) -> None:
        ctx = self.hparams.context
        self.train_set = BlockDataset(read_tokens(self.token_dir, "train"), ctx)
        val_tokens = read_tokens(self.token_dir, "val")
        if len(val_tokens) < ctx:  # no held-out documents: validate on the training stream's tail
            train = read_tokens(self.token_dir, "train")
            val_tokens = train[-max(len(train) // 10, ctx):]
        val = BlockDataset(val_tokens, ctx)
        limit = min(len(val), self.hparams.val_batches * self.hparams.batch_size)
        self.val_set = torch.utils.data.Subset(val, range(limit))
        if len(self.train_set) == 0:
            raise ValueError(f"training tokens ({len(self.train_set.tokens)}) are fewer than one block of "
                             f"{ctx}; lower model.context or use a larger corpus")

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=gen,
                          drop_last=len(self.train_set) >= self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
