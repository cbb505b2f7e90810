"""The network, its LightningModule, and its files: `model.safetensors` + `config.json`, reloaded by `load_network`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from components.lib.training import configure_optimizer

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": None}
FORMAT = "llmcycle-feedforward"


class Standardize(nn.Module):
    """(x - shift) / scale with fixed statistics: buffers, saved with the weights and never trained."""

    def __init__(self, shift: list[float], scale: list[float]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def build_network(inputs: int, layers: list[int], outputs: int, activation: str = "tanh", bias: bool = True,
                  dropout: float = 0.0, shift: list[float] | None = None, scale: list[float] | None = None,
                  init: str = "torch") -> nn.Sequential:
    """Standardize -> (Linear -> activation -> dropout) per hidden layer -> Linear, named as in the course's
    `nn.Sequential` slide (`layer1`, `relu1`, ..., `output`); `init: playground` draws Playground's initial weights."""
    net = nn.Sequential()
    net.add_module("standardize", Standardize(shift or [0.0] * inputs, scale or [1.0] * inputs))
    width = inputs
    for i, hidden in enumerate(layers, start=1):
        net.add_module(f"layer{i}", nn.Linear(width, hidden, bias=bias))
        if ACTIVATIONS[activation] is not None:
            net.add_module(f"{activation}{i}", ACTIVATIONS[activation]())
        if dropout:
            net.add_module(f"dropout{i}", nn.Dropout(dropout))
        width = hidden
    net.add_module("output", nn.Linear(width, outputs, bias=bias))
    if init == "playground":  # its nn.ts: Math.random() - 0.5 for a link's weight, 0.1 for a node's bias
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.uniform_(layer.weight, -0.5, 0.5)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0.1)
    return net


def measure(net: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """Sums over the examples: `loss` (cross-entropy in nats, or squared error), `right` or `abs_error`, `count`."""
    out = net(x)
    if task == "classification":
        return {"loss": float(nn.functional.cross_entropy(out, y, reduction="sum")),
                "right": float((out.argmax(-1) == y).sum()), "count": len(y)}
    error = out.squeeze(-1) - y
    return {"loss": float((error ** 2).sum()), "abs_error": float(error.abs().sum()), "count": len(y)}


def means(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """`<prefix>/loss` and `<prefix>/accuracy` or `<prefix>/mae` from the sums of `measure`."""
    n = max(sums["count"], 1)
    out = {f"{prefix}/loss": sums["loss"] / n}
    if "right" in sums:
        out[f"{prefix}/accuracy"] = sums["right"] / n
    else:
        out[f"{prefix}/mae"] = sums["abs_error"] / n
    return out


def add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two sums of `measure`, added key by key."""
    return {k: a.get(k, 0.0) + v for k, v in b.items()}


class FeedforwardModule(L.LightningModule):
    """A fully connected network trained on single examples or small batches; validation measures the held-out
    split and closes a round of the loss curve (the training mean since the last round beside it)."""

    def __init__(self, inputs: int = 2, outputs: int = 2, layers: list[int] | None = None, activation: str = "tanh",
                 bias: bool = True, dropout: float = 0.0, task: str = "classification", optimizer: str = "sgd",
                 lr: float = 0.03, momentum: float = 0.9, weight_decay: float = 0.0,
                 shift: list[float] | None = None, scale: list[float] | None = None, init: str = "torch"):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(inputs, list(layers if layers is not None else [4, 2]), outputs, activation, bias,
                                 dropout, shift, scale, init)
        self.since: dict[str, float] = {}  # training sums since the last round
        self.val_sums: dict[str, float] = {}
        self.curve: list[dict[str, float]] = []  # one row per round: step, train/..., val/...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.hparams.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(-1), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        loss = self.loss(out, y)
        with torch.no_grad():
            sums = {"loss": float(loss) * len(y), "count": len(y)}
            if self.hparams.task == "classification":
                sums["right"] = float((out.argmax(-1) == y).sum())
            else:
                sums["abs_error"] = float((out.squeeze(-1) - y).abs().sum())
        self.since = add(self.since, sums)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums = {}

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_sums = add(self.val_sums, measure(self.net, *batch, self.hparams.task))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        row = self.close_round(self.global_step, means(self.val_sums, "val"))
        self.log_dict({k: v for k, v in row.items() if k.startswith("val/")}, prog_bar=True)

    def close_round(self, step: int, val: dict[str, float]) -> dict[str, float]:
        """Append a curve row: the held-out measurement and the training means since the previous row."""
        row = {"step": step, **val, **(means(self.since, "train") if self.since.get("count") else {})}
        self.curve.append(row)
        self.since = {}
        return row

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["feedforward"] = {"curve": self.curve, "since": self.since}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("feedforward", {})
        self.curve, self.since = saved.get("curve", []), saved.get("since", {})

    def configure_optimizers(self):
        h = self.hparams
        # `momentum` is torch's SGD with a velocity; plain `sgd` has none; adam keeps torch's default betas.
        spec = {"name": "adam" if h.optimizer == "adam" else "sgd", "lr": h.lr, "weight_decay": h.weight_decay,
                "momentum": h.momentum if h.optimizer == "momentum" else 0.0, "betas": (0.9, 0.999)}
        return configure_optimizer(self.net.named_parameters(), spec, {"decay": "constant"}, 1)


# -- files ------------------------------------------------------------------------------------------


def save_network(net: nn.Module, config: dict, folder: Path) -> Path:
    """`model.safetensors` (weights and the input standardization) and `config.json` (how to rebuild it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=2) + "\n")
    return folder


@dataclass
class Network:
    """A reloaded network: the torch module, its config, and predictions from raw inputs."""

    net: nn.Sequential
    config: dict

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes) or values (n,) for rows of the network's inputs (`config["features"]`)."""
        with torch.no_grad():
            out = self.net(torch.as_tensor(np.asarray(inputs), dtype=torch.float32))
        if self.config["task"] == "classification":
            return out.softmax(-1).numpy()
        return out.squeeze(-1).numpy()


def load_network(folder: str | Path) -> Network:
    """Rebuild a saved feedforward network (in eval mode) from its folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; expected a feedforward step's `network` folder")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected '{FORMAT}'")
    state = load_file(str(folder / "model.safetensors"))
    net = build_network(len(config["features"]), config["layers"], config["outputs"], config["activation"],
                        config["bias"], config["dropout"])
    net.load_state_dict(state)
    return Network(net.eval(), config)


# -- the max quiz ------------------------------------------------------------------------------------


def hidden_units(net: nn.Sequential, names: list[str]) -> list[dict] | None:
    """One row per hidden unit of a one-hidden-layer, one-output network: its input weights, bias and output
    weight, and the unit as a term `v·relu(w·x)` with w scaled to a largest |weight| of 1 (relu(c z) = c relu(z)
    for c > 0). With no hidden layer, one row: the plane. None for deeper networks."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    if len(linears) > 2 or linears[-1].out_features != 1:
        return None
    if len(linears) == 1:
        w, b = linears[0].weight[0].detach().double().numpy(), _bias(linears[0], 0)
        term = _linear(w, names) + (f" {'+' if b >= 0 else '-'} {abs(b):.3f}" if b else "")
        return [{"unit": "output", **{f"w_{n}": float(wi) for wi, n in zip(w, names)}, "bias": b,
                 "output_weight": 1.0, "term": term}]
    first, out = linears
    act = next((k for k, m in net.named_children() if k not in ("standardize", "layer1", "output")
                and not k.startswith("dropout")), "linear").rstrip("0123456789")
    rows = []
    for j in range(first.out_features):
        w, b = first.weight[j].detach().double().numpy(), _bias(first, j)
        v = float(out.weight[0, j].detach())
        c = float(np.abs(w).max()) or 1.0
        inner = _linear(w / c, names) + (f" {'+' if b >= 0 else '-'} {abs(b) / c:.3f}" if b else "")
        rows.append({"unit": f"unit {j + 1}", **{f"w_{n}": float(wi) for wi, n in zip(w, names)}, "bias": b,
                     "output_weight": v, "term": f"{v * c:.3f}·{act}({inner})"})
    return rows


def _bias(layer: nn.Linear, j: int) -> float:
    return float(layer.bias[j].detach()) if layer.bias is not None else 0.0


def _linear(w: np.ndarray, names: list[str]) -> str:
    return " + ".join(f"{wi:.3f}{n}" for wi, n in zip(w, names)).replace("+ -", "- ")
