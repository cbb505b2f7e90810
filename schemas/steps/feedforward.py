"""`feedforward`: a small fully connected network trained by SGD on the course's first problems.

Named after what the course calls these networks ("réseaux feed forward": no loop from an output back to an
input). The data are TensorFlow Playground's 2-D sets, the Palmer penguins, a coastline streamed one point at a
time, the max(a, b) quiz, or a CSV file; the network, optimizer and early stopping are set here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..base import InputFiles, Section, StepSpec

PLAYGROUND = ("gauss", "xor", "circle", "spiral")
GENERATED = (*PLAYGROUND, "max", "coastline")  # drawn from a seeded generator: `n` and `noise` apply
CLASSIFICATION = (*PLAYGROUND, "coastline", "penguins")
FEATURES = ("x", "y", "x2", "y2", "xy", "sin_x", "sin_y", "cos_x", "cos_y")
DEFAULT_N = {"coastline": 20_000}  # every other generated set: Playground's 500 points


class CsvSpec(Section):
    """A CSV file (or several with the same header) with one row per example."""

    files: InputFiles = Field(min_length=1)
    """CSV files or globs, relative to the spec; the first line of each is the header."""
    label: str = Field(min_length=1)
    """The column holding the target: a class name (classification) or a number (regression)."""
    features: list[str] | None = Field(None, min_length=1)
    """Numeric columns the network reads (null: every column but the label)."""
    delimiter: str = Field(",", min_length=1, max_length=1)
    """Field separator."""

    @model_validator(mode="after")
    def _label_apart(self) -> "CsvSpec":
        if self.features and self.label in self.features:
            raise ValueError(f"features lists the label column '{self.label}'; the network cannot read its target")
        return self


class FeedforwardDataSpec(Section):
    """Where the examples come from: exactly one of `builtin` and `csv`."""

    builtin: Literal["gauss", "xor", "circle", "spiral", "max", "coastline", "penguins"] | None = None
    """Playground's `gauss`, `xor`, `circle`, `spiral`; `max` ((a, b) -> max(a, b), a and b in [0, 1]);
    `coastline` (a stream of (latitude, longitude) -> sea/land); `penguins` (4 measurements -> 3 species)."""
    csv: CsvSpec | None = None
    """A CSV file with a label column."""
    n: int | None = Field(None, ge=8, le=10_000_000)
    """Examples drawn from a generated set, train and held out together (null: 500 as in Playground; the
    coastline: 20000)."""
    noise: float = Field(0.0, ge=0, le=0.5)
    """Playground's noise slider / 100 for its sets; the coastline: share of labels flipped; max: standard
    deviation of Gaussian noise on the target."""
    train_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of the examples trained on; the rest are held out (Playground's "ratio of training to test data")."""

    @model_validator(mode="after")
    def _one_source(self) -> "FeedforwardDataSpec":
        if (self.builtin is None) == (self.csv is None):
            raise ValueError("give exactly one of builtin (gauss, xor, circle, spiral, max, coastline, penguins) "
                             "or csv (a file with a label column)")
        for name in ("n", "noise"):
            if name in self.model_fields_set and self.builtin not in GENERATED:
                source = f"builtin '{self.builtin}'" if self.builtin else "csv"
                raise ValueError(f"{name} applies to generated sets ({', '.join(GENERATED)}); {source} has fixed "
                                 f"rows: remove {name}")
        return self

    def size(self) -> int | None:
        """Examples of a generated set (None: the rows of a table)."""
        if self.builtin not in GENERATED:
            return None
        return self.n if self.n is not None else DEFAULT_N.get(self.builtin, 500)


class NetworkSpec(Section):
    """The fully connected network: inputs, hidden layers, activation."""

    features: list[Literal["x", "y", "x2", "y2", "xy", "sin_x", "sin_y", "cos_x", "cos_y"]] = \
        Field(["x", "y"], min_length=1)
    """Playground's input features computed from a point (x, y): `x2` is x², `xy` is x·y, `sin_x` is sin(x), ...
    (Playground sets only; other data feed their own columns)."""
    layers: list[int] = Field([4, 2], max_length=32)
    """Widths of the hidden layers, input side first (`[]`: no hidden layer, a linear model)."""
    activation: Literal["linear", "relu", "tanh", "sigmoid"] = "tanh"
    """Non-linearity after every hidden layer (`linear`: none, so the whole network stays linear)."""
    bias: bool = True
    """Give every layer a bias (the max quiz's network has none)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout after every hidden activation, during training only."""
    init: Literal["torch", "playground"] = "torch"
    """Initial weights: `torch` (PyTorch's default, uniform within ±1/sqrt(fan-in)) or `playground` (TensorFlow
    Playground's: weights uniform in [-0.5, 0.5], biases 0.1, which keeps narrow ReLU layers alive)."""

    @model_validator(mode="after")
    def _widths(self) -> "NetworkSpec":
        bad = [w for w in self.layers if w < 1 or w > 4096]
        if bad:
            raise ValueError(f"layers are hidden widths from 1 to 4096, got {bad[0]}")
        if len(set(self.features)) != len(self.features):
            raise ValueError("features lists a feature twice")
        return self


class FeedforwardOptimizerSpec(Section):
    """The gradient step: plain SGD, SGD with momentum, or Adam (an adaptive algorithm)."""

    name: Literal["sgd", "momentum", "adam"] = "sgd"
    """`sgd`: w -= lr·g; `momentum`: SGD with a velocity (torch's SGD, `momentum`); `adam`: Kingma & Ba 2015."""
    lr: float = Field(0.03, gt=0, le=100)
    """Learning rate, constant through training (Playground's default 0.03)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum of `momentum` (ignored by sgd and adam)."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 penalty on the weights (not the biases), Playground's L2 regularization rate."""


class FeedforwardEarlyStoppingSpec(Section):
    """Stop when a held-out measurement stops improving, and keep the best weights seen."""

    metric: Literal["val/loss", "val/accuracy"] = "val/loss"
    """What to watch: held-out loss (lower is better) or accuracy (higher is better; classification only)."""
    patience: int = Field(10, ge=1)
    """Validation rounds without improvement before stopping."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""


class FeedforwardSpec(StepSpec):
    """Train a small fully connected network with SGD on a toy, tabular or streamed data set."""

    produces: ClassVar[frozenset[str]] = frozenset({"network"})

    kind: Literal["feedforward"]
    data: FeedforwardDataSpec
    """The examples and how they are split into training and held-out."""
    task: Literal["classification", "regression"] | None = None
    """Classification (softmax cross-entropy) or regression (mean squared error); null: inferred from the
    data (max: regression; a CSV: classification when the labels are not all numbers or are at most 10
    distinct integers)."""
    network: NetworkSpec = NetworkSpec()
    """Inputs, hidden layers and activation."""
    optimizer: FeedforwardOptimizerSpec = FeedforwardOptimizerSpec()
    """The gradient step."""
    batch_size: int = Field(10, ge=1, le=1_000_000)
    """Examples per gradient step (1: the pure stochastic gradient, one example at a time; 10: Playground's)."""
    epochs: int | None = Field(None, ge=1, le=100_000)
    """Passes over the training examples (null: 100, the coastline stream 1, unless max_steps is given)."""
    max_steps: int | None = Field(None, ge=1)
    """Gradient steps to train for (alternative to epochs)."""
    val_every: int | None = Field(None, ge=1)
    """Measure the held-out split (a point of the curves, a round of early stopping) every this many steps
    (null: every epoch, or every few so that there are at most 50 rounds; the coastline: 20 times a pass)."""
    early_stopping: FeedforwardEarlyStoppingSpec | None = None
    """Stop when the held-out metric stops improving and keep the best weights (null: train to the end)."""
    frames: int = Field(6, ge=0, le=60)
    """Pictures of the decision boundary (or the map) through training, for 2-D inputs (0: only the final one)."""

    @model_validator(mode="after")
    def _consistent(self) -> "FeedforwardSpec":
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        if "features" in self.network.model_fields_set and self.data.builtin not in PLAYGROUND:
            source = f"builtin '{self.data.builtin}'" if self.data.builtin else "csv (use csv.features)"
            raise ValueError(f"network.features are Playground's inputs (for {', '.join(PLAYGROUND)}); {source} "
                             "feeds its own columns: remove network.features")
        task = self.inferred_task()
        if task == "regression" and self.data.builtin in CLASSIFICATION:
            raise ValueError(f"builtin '{self.data.builtin}' has class labels; task must be classification")
        if task == "classification" and self.data.builtin == "max":
            raise ValueError("builtin 'max' has a numeric target; task must be regression")
        stopping = self.early_stopping
        if stopping is not None and stopping.metric == "val/accuracy" and task == "regression":
            raise ValueError("early_stopping.metric val/accuracy needs classification; use val/loss")
        return self

    def inferred_task(self) -> str | None:
        """The task from `task` or the builtin set (None: a CSV's labels decide)."""
        if self.task is not None:
            return self.task
        if self.data.builtin == "max":
            return "regression"
        return "classification" if self.data.builtin else None

    def plan_details(self) -> dict:
        net = self.network
        hidden = f"hidden {'-'.join(str(w) for w in net.layers)} {net.activation}" if net.layers else "no hidden layer"
        source = self.data.builtin or ", ".join(self.data.csv.files)
        return {"network": f"{hidden}, bias {'on' if net.bias else 'off'}",
                "training": f"{source}, {self.optimizer.name} lr={self.optimizer.lr}, batch {self.batch_size}"}
