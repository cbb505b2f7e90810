"""The feedforward kind's examples: Playground's 2-D sets, max(a, b), the streamed coastline, penguins, CSV.

Every source gives a `Data`: a training set (in memory, or the coastline's stream), the held-out tensors, the
network's fixed input standardization, and, for 2-D inputs, the `Plane` the pictures are drawn on. Generated
sets and splits are seeded by the step's seed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from components.lib.io import expand

PLAYGROUND_CLASSES = ["orange", "blue"]  # Playground's colours for its labels -1 and +1
MISSING = {"", "na", "nan", "null", "none"}  # cells read as a missing value (case-insensitive)
MAX_CSV_CLASSES = 10  # integer labels with at most this many values are classes, not numbers
PENGUIN_FEATURES = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]

# The coastline's map: a stretch of Atlantic coast, sea to the west. Land lies east of a wavy coast line, plus an
# island offshore; the network sees (latitude, longitude) scaled to [-1, 1] over this box.
LATITUDE, LONGITUDE = (43.0, 48.5), (-6.0, -1.0)
ISLAND = (47.3, -4.9, 0.35)  # latitude, longitude, radius in degrees


@dataclass
class Plane:
    """What the pictures of a 2-D input need: its axes, extent, the points to show, and how grid points feed in."""

    axes: tuple[str, str]
    """Names of the horizontal and vertical axes."""
    bounds: tuple[tuple[float, float], tuple[float, float]]
    inputs: Callable[[np.ndarray], np.ndarray]
    """Plane points (n, 2) -> the network's inputs (before its standardization)."""
    val_points: np.ndarray
    val_labels: np.ndarray
    train_points: np.ndarray | None = None
    """None for a stream: its points are never kept (the frames show the last few instead)."""
    train_labels: np.ndarray | None = None
    from_inputs: Callable[[np.ndarray], np.ndarray] | None = None
    """Network inputs -> plane points, for the stream's recent samples."""
    truth: Callable[[np.ndarray], np.ndarray] | None = None
    """Plane points -> the true class, drawn as a line (the coastline's coast)."""


@dataclass
class Data:
    """Training examples, held-out tensors and what the network and the pictures need to know about them."""

    train: Dataset
    val_x: torch.Tensor
    val_y: torch.Tensor
    feature_names: list[str]
    shift: list[float]
    """Subtracted from each input before the first layer (training statistics, or the map's centre)."""
    scale: list[float]
    task: str
    classes: list[str] | None
    train_rows: int
    dropped: int = 0
    plane: Plane | None = None
    streamed: bool = False


# -- TensorFlow Playground's sets (its dataset.ts, in its own coordinates: points within [-6, 6]) -----------


def playground(name: str, n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 2) and labels (0 = Playground's -1, 1 = its +1) drawn as Playground draws them."""
    if name == "gauss":
        std = math.sqrt(0.5 + 7 * noise)  # Playground maps noise [0, 0.5] to a variance in [0.5, 4]
        half = n // 2
        points = np.concatenate([rng.normal(2, std, (half, 2)), rng.normal(-2, std, (n - half, 2))])
        return points, np.r_[np.ones(half), np.zeros(n - half)].astype(np.int64)
    if name == "xor":
        points = rng.uniform(-5, 5, (n, 2))
        points += np.where(points > 0, 0.3, -0.3)  # Playground's padding away from the axes
        shaken = points + rng.uniform(-5, 5, (n, 2)) * noise  # noise moves the label, not the point
        return points, (shaken[:, 0] * shaken[:, 1] >= 0).astype(np.int64)
    if name == "circle":
        half = n // 2
        radius = np.r_[rng.uniform(0, 2.5, half), rng.uniform(3.5, 5, n - half)]
        angle = rng.uniform(0, 2 * math.pi, n)
        points = np.c_[radius * np.sin(angle), radius * np.cos(angle)]
        shaken = points + rng.uniform(-5, 5, (n, 2)) * noise
        return points, (np.hypot(shaken[:, 0], shaken[:, 1]) < 2.5).astype(np.int64)
    if name == "spiral":
        half = n // 2
        arms = []
        for delta, count in ((0.0, half), (math.pi, n - half)):
            i = np.arange(count) / count
            r, t = i * 5, 1.75 * i * 2 * math.pi + delta
            arms.append(np.c_[r * np.sin(t), r * np.cos(t)] + rng.uniform(-1, 1, (count, 2)) * noise)
        return np.concatenate(arms), np.r_[np.ones(half), np.zeros(n - half)].astype(np.int64)
    raise ValueError(f"unknown Playground set '{name}'")


def playground_features(points: np.ndarray, names: list[str]) -> np.ndarray:
    """Playground's input features of points (x, y): x, y, x2 (x²), y2, xy, sin_x, sin_y, cos_x, cos_y."""
    x, y = points[:, 0], points[:, 1]
    table = {"x": x, "y": y, "x2": x * x, "y2": y * y, "xy": x * y, "sin_x": np.sin(x), "sin_y": np.sin(y),
             "cos_x": np.cos(x), "cos_y": np.cos(y)}
    return np.stack([table[name] for name in names], axis=1)


def split(n: int, train_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices of the training and held-out rows (at least one of each)."""
    order = rng.permutation(n)
    cut = min(max(1, round(n * train_fraction)), n - 1)
    return order[:cut], order[cut:]


def tensors(x: np.ndarray, y: np.ndarray, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 inputs; class indices (int64) or float32 targets."""
    return (torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32))


def planar(points: np.ndarray, labels: np.ndarray, features: Callable[[np.ndarray], np.ndarray], names: list[str],
           axes: tuple[str, str], train_fraction: float, rng: np.random.Generator, task: str,
           classes: list[str] | None) -> Data:
    """A 2-D set in memory, split, with its plane for the pictures; inputs are fed as they are (as Playground)."""
    train, val = split(len(points), train_fraction, rng)
    x = features(points)
    pad = 0.05 * (points.max(0) - points.min(0)) + 1e-6
    low, high = points.min(0) - pad, points.max(0) + pad
    plane = Plane(axes=axes, bounds=((low[0], high[0]), (low[1], high[1])), inputs=features,
                  val_points=points[val], val_labels=labels[val], train_points=points[train],
                  train_labels=labels[train])
    val_x, val_y = tensors(x[val], labels[val], task)
    return Data(train=TensorDataset(*tensors(x[train], labels[train], task)), val_x=val_x, val_y=val_y,
                feature_names=names, shift=[0.0] * len(names), scale=[1.0] * len(names), task=task, classes=classes,
                train_rows=len(train), plane=plane)


def load_playground(name: str, n: int, noise: float, train_fraction: float, features: list[str], seed: int) -> Data:
    """One of Playground's sets, fed as its chosen features."""
    rng = np.random.default_rng([seed, 0])
    points, labels = playground(name, n, noise, rng)
    return planar(points, labels, lambda p: playground_features(p, features), list(features), ("x", "y"),
                  train_fraction, rng, "classification", PLAYGROUND_CLASSES)


def load_max(n: int, noise: float, train_fraction: float, seed: int) -> Data:
    """The max quiz: (a, b) uniform in [0, 1] -> max(a, b) (+ Gaussian noise of std `noise`)."""
    rng = np.random.default_rng([seed, 0])
    points = rng.uniform(0, 1, (n, 2))
    target = points.max(1) + rng.normal(0, noise, n)
    return planar(points, target, lambda p: p, ["a", "b"], ("a", "b"), train_fraction, rng, "regression", None)


# -- the coastline, streamed ------------------------------------------------------------------------------


def coast_longitude(latitude: np.ndarray) -> np.ndarray:
    """Longitude of the coast at each latitude (land lies east of it)."""
    u = np.asarray(latitude) - LATITUDE[0]
    return -3.2 + 0.9 * np.sin(1.1 * u) + 0.35 * np.sin(4.0 * u + 1.0)


def is_land(latitude: np.ndarray, longitude: np.ndarray) -> np.ndarray:
    """1 where (latitude, longitude) is land on the synthetic map, else 0 (sea)."""
    lat, lon = np.asarray(latitude), np.asarray(longitude)
    island = np.hypot(lat - ISLAND[0], (lon - ISLAND[1]) * 0.7) < ISLAND[2]  # a degree of longitude is shorter
    return ((lon > coast_longitude(lat)) | island).astype(np.int64)


class CoastlineStream(IterableDataset):
    """Samples (latitude, longitude) -> sea 0 / land 1, drawn one at a time from a seeded generator.

    The memory bound: the stream holds the generator's state and two counters, never a sample it has yielded;
    a DataLoader over it (no workers) holds one batch at a time. Each pass draws `n` fresh points (seed, pass), so
    training sees an unlimited supply, as the course's one-pixel camera does.
    """

    def __init__(self, n: int, noise: float, seed: int):
        self.n, self.noise, self.seed = n, noise, seed
        self.passes = 0
        self.produced = 0  # samples yielded so far, all passes (the memory test reads it)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        rng = np.random.default_rng([self.seed, 1, self.passes])
        self.passes += 1
        for _ in range(self.n):
            lat, lon = rng.uniform(*LATITUDE), rng.uniform(*LONGITUDE)
            label = int(is_land(lat, lon)) ^ int(rng.random() < self.noise)
            self.produced += 1
            yield torch.tensor([lat, lon], dtype=torch.float32), label


def load_coastline(n: int, noise: float, train_fraction: float, seed: int) -> Data:
    """The coastline: a stream of round(n * train_fraction) samples per pass, and a held-out sample in memory."""
    rng = np.random.default_rng([seed, 2])  # another stream than training's, so held-out points are new ones
    train_rows = max(1, round(n * train_fraction))
    held = max(1, n - train_rows)
    points = np.c_[rng.uniform(*LATITUDE, held), rng.uniform(*LONGITUDE, held)]
    labels = is_land(points[:, 0], points[:, 1]) ^ (rng.random(held) < noise)
    swap = lambda p: np.ascontiguousarray(np.asarray(p)[:, ::-1])  # noqa: E731 - a map: longitude across, latitude up
    plane = Plane(axes=("longitude", "latitude"), bounds=(LONGITUDE, LATITUDE), inputs=swap, val_points=swap(points),
                  val_labels=labels, from_inputs=swap, truth=lambda p: is_land(p[:, 1], p[:, 0]))
    centre = [sum(LATITUDE) / 2, sum(LONGITUDE) / 2]
    half = [(LATITUDE[1] - LATITUDE[0]) / 2, (LONGITUDE[1] - LONGITUDE[0]) / 2]
    val_x, val_y = tensors(points, labels, "classification")
    return Data(train=CoastlineStream(train_rows, noise, seed), val_x=val_x, val_y=val_y,
                feature_names=["latitude", "longitude"], shift=centre, scale=half, task="classification",
                classes=["sea", "land"], train_rows=train_rows, plane=plane, streamed=True)


# -- tables: penguins and CSV files ---------------------------------------------------------------------


def table(x: np.ndarray, labels: list, names: list[str], task: str, train_fraction: float, seed: int,
          dropped: int) -> Data:
    """Rows in memory, split and standardized with the training rows' statistics only."""
    rng = np.random.default_rng([seed, 0])
    train, val = split(len(x), train_fraction, rng)
    if task == "classification":
        classes = sorted({str(v) for v in labels})
        y = np.array([classes.index(str(v)) for v in labels], dtype=np.int64)
    else:
        classes, y = None, np.array(labels, dtype=np.float64)
    mean, std = x[train].mean(0), x[train].std(0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays constant instead of dividing by zero
    plane = None
    if x.shape[1] == 2:
        pad = 0.05 * (x.max(0) - x.min(0)) + 1e-6
        low, high = x.min(0) - pad, x.max(0) + pad
        plane = Plane(axes=(names[0], names[1]), bounds=((low[0], high[0]), (low[1], high[1])), inputs=lambda p: p,
                      val_points=x[val], val_labels=y[val], train_points=x[train], train_labels=y[train])
    val_x, val_y = tensors(x[val], y[val], task)
    return Data(train=TensorDataset(*tensors(x[train], y[train], task)), val_x=val_x, val_y=val_y,
                feature_names=names, shift=mean.tolist(), scale=std.tolist(), task=task, classes=classes,
                train_rows=len(train), dropped=dropped, plane=plane)


def load_penguins(train_fraction: float, seed: int, task: str | None) -> Data:
    """The Palmer penguins (Gorman et al. 2014; the palmerpenguins package): 4 measurements -> 3 species.
    Rows missing a measurement are dropped and counted."""
    from palmerpenguins import load_penguins as penguins

    frame = penguins()[PENGUIN_FEATURES + ["species"]]
    kept = frame.dropna()
    return table(kept[PENGUIN_FEATURES].to_numpy(dtype=np.float64), kept["species"].tolist(), list(PENGUIN_FEATURES),
                 task or "classification", train_fraction, seed, dropped=len(frame) - len(kept))


def read_csv(path: Path, label: str, features: list[str] | None, delimiter: str) -> tuple[list, list, list, int]:
    """(feature rows, (label, FILE:LINE) pairs, feature names, rows dropped for a missing cell) of one CSV file;
    a malformed row raises naming FILE:LINE."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}:1: empty file; expected a header line naming the columns")
        header = [h.strip() for h in header]
        names = features or [h for h in header if h != label]
        for column in [label, *names]:
            if column not in header:
                raise ValueError(f"{path}:1: no column '{column}' in the header; columns: {', '.join(header)}")
        if not names:
            raise ValueError(f"{path}:1: no feature column besides the label '{label}'")
        where = [header.index(c) for c in names]
        rows, labels, dropped = [], [], 0
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}:{line}: {len(cells)} fields where the header has {len(header)}")
            wanted = [cells[i].strip() for i in where] + [cells[header.index(label)].strip()]
            if any(c.lower() in MISSING for c in wanted):
                dropped += 1
                continue
            try:
                rows.append([float(cells[i]) for i in where])
            except ValueError:
                bad = next(names[k] for k, i in enumerate(where) if not _is_number(cells[i]))
                raise ValueError(f"{path}:{line}: column '{bad}' is '{cells[header.index(bad)].strip()}', not a "
                                 "number; feature columns must be numeric (or empty/NA to drop the row)") from None
            labels.append((wanted[-1], f"{path}:{line}"))
    return rows, labels, names, dropped


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def csv_task(labels: list[str]) -> str:
    """Classification when a label is not a number or the labels are at most MAX_CSV_CLASSES distinct integers."""
    if not all(_is_number(v) for v in labels):
        return "classification"
    values = {float(v) for v in labels}
    return "classification" if all(v.is_integer() for v in values) and len(values) <= MAX_CSV_CLASSES else \
        "regression"


def load_csv(files: list[str], label: str, features: list[str] | None, delimiter: str, train_fraction: float,
             seed: int, task: str | None, resolve: Callable[[str], Path]) -> Data:
    """Every row of the CSV files (one header, the same columns in each)."""
    rows, labels, names, dropped = [], [], None, 0
    for path in expand(files, resolve, "data.csv.files"):
        r, lab, cols, d = read_csv(path, label, features, delimiter)
        if names is not None and cols != names:
            raise ValueError(f"{path}:1: feature columns {cols} differ from the first file's {names}")
        rows, labels, names, dropped = rows + r, labels + lab, cols, dropped + d
    if len(rows) < 2:
        raise ValueError(f"data.csv.files: {len(rows)} complete rows in {', '.join(files)}; need at least 2 "
                         "(one to train on, one held out)")
    located, labels = labels, [v for v, _ in labels]
    task = task or csv_task(labels)
    if task == "regression":
        bad = next(((v, at) for v, at in located if not _is_number(v)), None)
        if bad is not None:
            raise ValueError(f"{bad[1]}: label '{label}' is '{bad[0]}', not a number, but task is regression; set "
                             "task: classification or fix the row")
        labels = [float(v) for v in labels]
    return table(np.array(rows, dtype=np.float64), labels, names, task, train_fraction, seed, dropped)
