"""What a model costs to serve: its weight files on disk and its greedy generation latency per token.

Used by optimize (each variant against the baseline) and distill (the student against the teacher).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from components.lib.text import encode, pad_token, start_token


@torch.inference_mode()
def ms_per_token(model, tokenizer, prompt: str = "The ", new_tokens: int = 32, repeats: int = 3) -> float:
    """Median wall time per generated token over `repeats` greedy generations of exactly `new_tokens` tokens
    (after one short warm-up)."""
    device = next(model.parameters(), torch.empty(0)).device
    ids = torch.tensor([encode(tokenizer, prompt) or [start_token(tokenizer)]], device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=pad_token(tokenizer))
    model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.generate(**batch, **kwargs)
        times.append((time.perf_counter() - started) / new_tokens)
    return 1000 * statistics.median(times)


def size_mb(folder: Path) -> float:
    """Size of the weight files (not the tokenizer) on disk, in MiB."""
    weights = [f for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".pt", ".bin")]
    return sum(f.stat().st_size for f in weights) / 2**20
