"""Training data at scale: weighted mixtures of sources, and JSONL files streamed from disk instead of loaded.

**Mixtures** (`data.mixture`). Each draw picks a source with probability weight / (sum of the weights), from a
numpy Generator seeded with the pipeline seed, and takes that source's next row; each source walks its own
seeded shuffle of its rows and reshuffles when it runs out, so no row repeats before its source's others have
come. The source picks depend on the weights and the seed only, never on the rows, so the proportions of any
first n draws are known without reading data (`Draws.counts`). Loaded sources: a pass is the first
`mixture_size` draws (default: the sum of the sources' training rows), drawn once into a list that trains as
loaded rows do (shuffled per epoch, packed by `bfd`). With a streamed source the draws go on as long as
training does. Held-out rows: each source's own (its eval_files, its hash split, or the builtin held-out
combinations), all of them concatenated and scored together.

Not `datasets.interleave_datasets`: our rows keep their file:line (`_where`) for the errors of a bad row,
builtin sources are generated lists, and the training rows stay plain Python rows that the kinds' own encoders
(`sft.encode_rows`, `preferences.encode_pairs`) and `bfd` packing take; a sampler over Python iterators is a
few lines.

**Streaming** (`data.stream`, `auto`: a source whose files total over `STREAM_ABOVE` bytes). `JsonlStream` reads
lines lazily (`io.jsonl_rows`, so a bad line still names file:line), holds rows out by the content hash of
`io.split_rows` (a streamed and a loaded file split identically, including split_rows' rule that holds the last
row out when the hash holds none), keeps the first `MAX_HELD` held-out rows for evaluation (the others are
neither trained on nor scored), shuffles the training rows in a seeded buffer of `SHUFFLE_BUFFER` rows, and
reads the files again, reshuffled, for every further pass. `EncodedStream` tokenises rows as they are drawn. So
memory holds the buffer and the held-out rows, whatever the files' size. A stream has no length: the budget is
max_steps or max_tokens (tokens per step estimated from the first `ESTIMATE_ROWS` rows).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from components.lib.io import held_out, jsonl_rows, read_jsonl, split_rows
from schemas.data import STREAM_ABOVE_MB

STREAM_ABOVE = STREAM_ABOVE_MB * 2 ** 20  # `stream: auto` streams a source whose training files total more
MAX_HELD = 2000  # held-out rows of a streamed source that are scored (the first ones, in file order)
SHUFFLE_BUFFER = 10_000  # rows in a streamed source's shuffle buffer
ESTIMATE_ROWS = 256  # rows whose mean length estimates a streamed step's tokens per step
PICK_CHUNK = 4096  # source picks drawn at once (the sequence does not depend on it being drawn in chunks)
_PICKS, _ORDER = 0x6D6978, 0x6F7264  # seed-sequence tags: the mixture's picks, a source's row order


def streams(setting: bool | str, paths: Sequence[Path]) -> bool:
    """Whether to stream files under `data.stream` (true, false, or auto: over STREAM_ABOVE bytes in all)."""
    if setting == "auto":
        return sum(Path(p).stat().st_size for p in paths) > STREAM_ABOVE
    return bool(setting)


def buffer_shuffled(rows: Iterable, rng: np.random.Generator, size: int = SHUFFLE_BUFFER) -> Iterator:
    """The rows in a random order holding at most `size` of them: each row out is a random one of the buffer,
    replaced by the next row in (as `datasets`' IterableDataset.shuffle and tf.data do)."""
    buffer: list = []
    picks: list[int] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        if not picks:
            picks = rng.integers(size, size=PICK_CHUNK).tolist()
        i = picks.pop()
        yield buffer[i]
        buffer[i] = row
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


class JsonlStream:
    """The training rows of JSONL files, read lazily, without the held-out ones, endlessly (`passes`).

    `fraction`: the share held out by `io.held_out` (None: none, the held-out rows come from eval_files);
    `transform` turns a raw row into the row the kind trains on (preferences: `normalize_pair`). `held` holds
    the first `max_held` held-out rows, found at construction by reading until that many were seen.
    """

    def __init__(self, paths: Sequence[Path], fraction: float | None, seed: int, label: str = "data",
                 transform: Callable[[dict], dict] | None = None, max_held: int = MAX_HELD,
                 buffer: int = SHUFFLE_BUFFER):
        self.paths, self.fraction, self.seed, self.label = [Path(p) for p in paths], fraction, seed, label
        self.transform, self.buffer = transform or (lambda row: row), buffer
        self._last_held: str | None = None  # split_rows' rule: the last row, when the hash holds none out
        self.held = [self.transform(r) for r in self._scan_held(max_held)]

    def raw_rows(self) -> Iterator[dict]:
        """Every row of the files in order, tagged `_where`; a bad line raises naming file:line."""
        for path in self.paths:
            yield from jsonl_rows(path)

    def _is_held(self, row: dict) -> bool:
        return self.fraction is not None and (held_out(row, self.fraction, self.seed)
                                              or row["_where"] == self._last_held)

    def _scan_held(self, limit: int) -> list[dict]:
        if self.fraction is None:
            return []
        held, count, last = [], 0, None
        for row in self.raw_rows():
            count, last = count + 1, row
            if self._is_held(row):
                held.append(row)
                if len(held) == limit:
                    return held
        if not held and count > 1:
            self._last_held = last["_where"]
            held = [last]
        return held

    def kept(self) -> Iterator[dict]:
        """The training rows in file order (transformed)."""
        return (self.transform(r) for r in self.raw_rows() if not self._is_held(r))

    def passes(self, seed: Any) -> Iterator[dict]:
        """The training rows, pass after pass, each pass in another buffer-shuffled order."""
        for n in itertools.count():
            rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), n])
            empty = True
            for row in buffer_shuffled(self.kept(), rng, self.buffer):
                empty = False
                yield row
            if empty:
                raise ValueError(f"{self.label}: no training rows left after holding out the eval rows")


def cycled(rows: list, seed: Any, label: str = "data") -> Iterator:
    """A loaded source's rows, pass after pass, each pass in a fresh seeded order."""
    if not rows:
        raise ValueError(f"{label}: no training rows left after holding out the eval rows")
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(rows)):
            yield rows[i]


@dataclass
class Source:
    """One source of training data: its name and weight in a mixture, its training rows (a list, or a
    `JsonlStream`) and its held-out rows."""

    name: str
    weight: float
    train: list[dict] | JsonlStream
    held: list[dict]

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, JsonlStream)

    def rows(self, seed: Any) -> Iterator[dict]:
        return self.train.passes(seed) if self.streamed else cycled(self.train, seed, f"mixture source {self.name}")


def picks(weights: Sequence[float], seed: int) -> Iterator[int]:
    """The source index of each draw, endlessly: i with probability weights[i] / sum (seeded numpy)."""
    p = np.asarray(weights, dtype=float)
    p = p / p.sum()
    rng = np.random.default_rng([seed, _PICKS])
    while True:
        yield from rng.choice(len(p), size=PICK_CHUNK, p=p).tolist()


class Draws:
    """The training rows of one or more sources drawn by weight, endlessly; iterating again starts the same
    sequence afresh. `mixed`: a `data.mixture` (its proportions are reported)."""

    def __init__(self, sources: list[Source], seed: int, mixed: bool = True):
        self.sources, self.seed, self.mixed = sources, seed, mixed

    def indexed(self) -> Iterator[tuple[int, dict]]:
        """(source index, row) per draw."""
        rows = [s.rows([self.seed, _ORDER, i]) for i, s in enumerate(self.sources)]
        for k in picks([s.weight for s in self.sources], self.seed):
            yield k, next(rows[k])

    def __iter__(self) -> Iterator[dict]:
        return (row for _, row in self.indexed())

    def head(self, n: int) -> list[dict]:
        """The first n rows drawn."""
        return list(itertools.islice(self, n))

    def counts(self, n: int) -> list[int]:
        """Rows per source among the first n draws (from the picks alone: no row is read)."""
        drawn = np.fromiter(itertools.islice(picks([s.weight for s in self.sources], self.seed), n), np.int64, n)
        return np.bincount(drawn, minlength=len(self.sources)).tolist()


class MixedRows(list):
    """A pass of a mixture of loaded sources: the drawn rows (a list), with `sources` and the rows per source."""

    def __init__(self, rows: list[dict], sources: list[Source], per_source: list[int]):
        super().__init__(rows)
        self.sources, self.per_source = sources, per_source


def training_rows(sources: list[Source], seed: int, size: int | None = None,
                  mixed: bool = True) -> list[dict] | MixedRows | Draws:
    """The training rows of a data section: a single loaded source's list as it is, a pass of a loaded mixture
    (`size` draws; default the sum of the sources' rows), or endless `Draws` when a source is streamed."""
    if any(s.streamed for s in sources):
        return Draws(sources, seed, mixed)
    if not mixed:
        return sources[0].train
    draws = Draws(sources, seed)
    n = size or sum(len(s.train) for s in sources)
    indexed = list(itertools.islice(draws.indexed(), n))
    return MixedRows([row for _, row in indexed], sources,
                     np.bincount([k for k, _ in indexed], minlength=len(sources)).tolist())


def held_rows(sources: list[Source]) -> list[dict]:
    """Every source's held-out rows, concatenated in the mixture's order."""
    return [row for s in sources for row in s.held]


def file_source(paths: Sequence[Path], eval_paths: Sequence[Path], fraction: float, seed: int,
                stream: bool | str, label: str,
                transform: Callable[[dict], dict] | None = None) -> tuple[list[dict] | JsonlStream, list[dict]]:
    """(training rows, held-out rows) of JSONL files: the eval files' rows, else the `fraction` that
    `io.split_rows` holds out; the training rows loaded, or a `JsonlStream` when `stream` says so."""
    f = transform or (lambda row: row)
    held = [f(r) for p in eval_paths for r in read_jsonl(p)]
    if streams(stream, paths):
        train = JsonlStream(paths, None if held else fraction, seed, label, transform)
        return train, held or train.held
    rows = [r for p in paths for r in read_jsonl(p)]
    if not held:
        rows, held = split_rows(rows, fraction, seed)
        held = [f(r) for r in held]
    return [f(r) for r in rows], held


def sample(train: list[dict] | Draws, n: int) -> list[dict]:
    """Up to n training rows (all of a list; the first n drawn from a stream), e.g. a pool of few-shot examples."""
    return train.head(n) if isinstance(train, Draws) else list(train)


def trained_rows(train: list[dict] | Draws, steps: int, rows_per_step: int) -> int:
    """Training rows behind `steps` optimizer steps: a list's length, or the rows drawn from a stream."""
    return steps * rows_per_step if isinstance(train, Draws) else len(train)


def mixture_metrics(train: list[dict] | MixedRows | Draws, rows_drawn: int = 0) -> dict[str, float]:
    """`data/mixture/<source>` (share of the training rows) and `data/mixture/<source>/rows` of a mixture: over a
    loaded mixture's pass, or over the first `rows_drawn` draws of a stream; {} for data that is not mixed."""
    if isinstance(train, MixedRows):
        sources, counts = train.sources, train.per_source
    elif isinstance(train, Draws) and train.mixed:
        sources, counts = train.sources, train.counts(rows_drawn)
    else:
        return {}
    total = max(1, sum(counts))
    out: dict[str, float] = {}
    for s, n in zip(sources, counts):
        out[f"data/mixture/{s.name}"] = n / total
        out[f"data/mixture/{s.name}/rows"] = n
    return out


def describe_mixture(metrics: dict[str, float], sources: list[Source]) -> str:
    """One line: each source's realised share of the training rows beside its weight."""
    total = sum(s.weight for s in sources)
    rows = sum(int(metrics[f"data/mixture/{s.name}/rows"]) for s in sources)
    return f"mixture of {rows:,} training rows: " + ", ".join(
        f"{s.name} {metrics[f'data/mixture/{s.name}']:.1%} (weight {s.weight / total:.1%})" for s in sources)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes that share the training rows."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EncodedStream(torch.utils.data.IterableDataset):
    """Training examples encoded as they are drawn: `encode([row])[0]` per row of `rows`, e.g. the (input ids,
    labels) tuples of `sft.encode_rows` or the pair dicts of `preferences.encode_pairs`. Under DDP each rank
    takes every world-th row, so the ranks train on different rows."""

    def __init__(self, rows: Draws, encode: Callable[[list[dict]], list]):
        super().__init__()
        self.rows, self.encode = rows, encode

    def __iter__(self) -> Iterator:
        rank, world = rank_and_world()
        for i, row in enumerate(self.rows):
            if i % world == rank:
                yield self.encode([row])[0]

    def estimate(self, n: int = ESTIMATE_ROWS) -> list:
        """The first n examples encoded, to estimate lengths (tokens per step) from."""
        return self.encode(self.rows.head(n))


def training_loader(train_rows: list[dict] | Draws, encode: Callable[[list[dict]], list], batch_size: int,
                    seed: int, collate: Callable, drop_last: bool = False) -> tuple[torch.utils.data.DataLoader, list]:
    """(DataLoader, examples to measure lengths on) of a kind's training rows: loaded rows encoded at once and
    shuffled per epoch (seeded; `drop_last` when there is a full batch), or a stream encoded as drawn (the
    lengths from its first `ESTIMATE_ROWS` rows)."""
    from torch.utils.data import DataLoader

    if isinstance(train_rows, Draws):
        stream = EncodedStream(train_rows, encode)
        return DataLoader(stream, batch_size=batch_size, collate_fn=collate), stream.estimate()
    train = encode(train_rows)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      collate_fn=collate, drop_last=drop_last and len(train) >= batch_size), train
