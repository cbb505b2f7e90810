"""`feedforward`: a small fully connected network trained by stochastic gradient descent (Robbins & Monro 1951).

Reads: builtin data (TensorFlow Playground's gauss/xor/circle/spiral, Smilkov & Carter 2016; the max(a, b)
quiz; a synthetic coastline streamed one point at a time; the Palmer penguins, Gorman et al. 2014) or CSV files.
Writes: `network/` (`model.safetensors` and `config.json`, reloaded by `network.load_network`), `metrics.json`,
`curve.json`, `loss_curve.png`, and for 2-D inputs `boundary.png`, `boundary_frames.png` and
`boundary_frames.gif` (the coastline: the map filling in as samples stream past); logs train/loss, val/loss and
val/accuracy (or val/mae) through Lightning's MLflow logger, the pictures and the network as artifacts, and for
the max quiz the learned units beside the course's max(a, b) = a + relu(b - a) as a table.

The coastline is never held in memory: it is an IterableDataset drawing one sample at a time (data.py), and
training keeps one batch, the weights and a RECENT-sample buffer for the pictures. Tiny networks run on the CPU
in float32 when the trainer says `auto`: a GPU's launch latency exceeds their arithmetic, and bf16 would hide the
max quiz's near-zero error.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from components.lib.context import StepContext, StepOutput, effort
from components.lib.training import count_parameters, fit, make_trainer
from schemas.base import TrainingLoop
from schemas.steps.feedforward import PLAYGROUND, FeedforwardSpec

from . import data as datasets
from . import pictures
from .network import FeedforwardModule, hidden_units, means, measure, save_network

DEFAULT_EPOCHS, STREAM_EPOCHS = 100, 1
STREAM_ROUNDS = 20  # validation rounds per pass over the stream
# Points per curve logged to MLflow by default: each is a write to the tracking store (tens of ms on a busy
# sqlite file), which would otherwise cost more than training a network this small.
ROUNDS, TRAIN_POINTS = 50, 50


def load_data(spec: FeedforwardSpec, ctx: StepContext) -> datasets.Data:
    """The step's examples, from its one source."""
    d = spec.data
    if d.builtin in PLAYGROUND:
        return datasets.load_playground(d.builtin, d.size(), d.noise, d.train_fraction, spec.network.features, ctx.seed)
    if d.builtin == "max":
        return datasets.load_max(d.size(), d.noise, d.train_fraction, ctx.seed)
    if d.builtin == "coastline":
        return datasets.load_coastline(d.size(), d.noise, d.train_fraction, ctx.seed)
    if d.builtin == "penguins":
        return datasets.load_penguins(d.train_fraction, ctx.seed, spec.task)
    c = d.csv
    data = datasets.load_csv(c.files, c.label, c.features, c.delimiter, d.train_fraction, ctx.seed, spec.task,
                             ctx.resolve_path)
    if spec.early_stopping is not None and spec.early_stopping.metric == "val/accuracy" and data.task == "regression":
        raise ValueError(f"early_stopping.metric val/accuracy needs classification, but the labels of "
                         f"'{c.label}' are numbers (regression); use val/loss or set task: classification")
    return data


def budget(spec: FeedforwardSpec, data: datasets.Data) -> tuple[int, int, int]:
    """(optimizer steps, steps per epoch, steps between validation rounds)."""
    per_epoch = math.ceil(data.train_rows / spec.batch_size)
    epochs = spec.epochs or (STREAM_EPOCHS if data.streamed else DEFAULT_EPOCHS)
    steps = spec.max_steps or epochs * per_epoch
    every = spec.val_every or (max(1, per_epoch // STREAM_ROUNDS) if data.streamed
                               else per_epoch * max(1, steps // per_epoch // ROUNDS))
    return steps, per_epoch, min(every, steps)


class KeepBest(Callback):
    """Remember the weights of the best validation round of `metric` (restored after early stopping)."""

    def __init__(self, metric: str, min_delta: float = 0.0):
        self.metric, self.min_delta = metric, min_delta
        self.sign = -1.0 if metric.endswith("loss") else 1.0  # lower loss, higher accuracy is better
        self.best, self.step, self.weights = None, 0, None

    def on_validation_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        if self.best is None or self.sign * (float(value) - self.best) > self.min_delta:
            self.best, self.step = float(value), trainer.global_step
            self.weights = copy.deepcopy(module.net.state_dict())

    def state_dict(self) -> dict:
        return {"best": self.best, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.step, self.weights = state["best"], state["step"], state["weights"]


def on_cpu_in_fp32(ctx: StepContext) -> StepContext:
    """The context with `auto` accelerator and precision resolved for a tiny network (see the module docstring)."""
    t = ctx.trainer
    update = {k: v for k, v in (("accelerator", "cpu"), ("precision", "32-true")) if getattr(t, k) == "auto"}
    return dataclasses.replace(ctx, trainer=t.model_copy(update=update)) if update else ctx


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread: for a few hundred weights, waking more threads costs more than the
    arithmetic (measured on 2 busy cores: 20 ms a step with two threads, 1.5 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frame_steps(steps: int, frames: int) -> list[int]:
    """Optimizer steps at which frames are taken: evenly spaced from the start to the end of training."""
    if frames <= 1:
        return []
    return sorted({round(i * steps / (frames - 1)) for i in range(1, frames)})


def loaders(spec: FeedforwardSpec, data: datasets.Data, seed: int) -> dict:
    """The training loader (shuffled each epoch, or the stream in order) and one held-out batch of everything."""
    shuffle = {} if data.streamed else {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    return {"train_dataloaders": DataLoader(data.train, batch_size=spec.batch_size, **shuffle),
            "val_dataloaders": DataLoader(TensorDataset(data.val_x, data.val_y), batch_size=len(data.val_y))}


def build(spec: FeedforwardSpec, data: datasets.Data) -> FeedforwardModule:
    """The LightningModule for the spec's network on these data."""
    net, opt = spec.network, spec.optimizer
    outputs = len(data.classes) if data.task == "classification" else 1
    return FeedforwardModule(len(data.feature_names), outputs, list(net.layers), net.activation, net.bias,
                             net.dropout, data.task, opt.name, opt.lr, opt.momentum, opt.weight_decay,
                             data.shift, data.scale, net.init)


def callbacks(spec: FeedforwardSpec, data: datasets.Data, module: FeedforwardModule,
              steps: int) -> tuple[KeepBest, pictures.Frames | None, list[Callback]]:
    """The best-round keeper, the frame taker (2-D inputs) and early stopping, as Lightning callbacks."""
    stopping = spec.early_stopping
    keep = KeepBest(stopping.metric if stopping else "val/loss", stopping.min_delta if stopping else 0.0)
    out: list[Callback] = [keep]
    if stopping is not None:
        out.append(EarlyStopping(monitor=stopping.metric, mode="min" if stopping.metric == "val/loss" else "max",
                                 patience=stopping.patience, min_delta=stopping.min_delta,
                                 check_on_train_epoch_end=False))
    frames = None
    if data.plane is not None:
        frames = pictures.Frames(data.plane, data.task, frame_steps(steps, spec.frames), data.streamed)
        if spec.frames:
            frames.take(module.net, 0)
        out.append(frames)
    return keep, frames, out


@torch.no_grad()
def held_out(module: FeedforwardModule, data: datasets.Data) -> dict[str, float]:
    """val/loss and val/accuracy (or val/mae) of the module's current weights, dropout off."""
    training = module.training
    module.eval()
    scores = means(measure(module.net, data.val_x, data.val_y, data.task), "val")
    module.train(training)
    return scores


def run(spec: FeedforwardSpec, ctx: StepContext) -> StepOutput:
    """Load the data, train the network, save it, draw and log the pictures, return the held-out figures."""
    started = time.perf_counter()
    L.seed_everything(ctx.seed, workers=True, verbose=False)
    data = load_data(spec, ctx)
    module = build(spec, data)
    params, _ = count_parameters(module.net)
    steps, per_epoch, every = budget(spec, data)
    print(f"{ctx.name}: {data.train_rows} training and {len(data.val_y)} held-out examples "
          f"({'streamed' if data.streamed else 'in memory'}), {data.dropped} dropped; {params} parameters", flush=True)

    before = held_out(module, data)
    module.curve.append({"step": 0, **before})
    keep, frames, extra = callbacks(spec, data, module, steps)
    # grad_clip off: the course's SGD takes the raw gradient, so a too-large step shows as it is
    loop = TrainingLoop(grad_clip=None, batch_size=spec.batch_size, max_steps=steps, val_every=every, val_batches=1,
                        checkpoint_every=max(100, steps // 4))
    trainer = make_trainer(on_cpu_in_fp32(ctx), loop, steps, params=params, callbacks=extra)
    trainer.log_every_n_steps = max(1, steps // TRAIN_POINTS)  # make_trainer's 10 is thousands at batch_size 1
    with one_thread():
        fit(trainer, module, ctx=ctx, **loaders(spec, data, ctx.seed))
    done = trainer.global_step
    stopped = spec.early_stopping is not None and done < steps
    if stopped and keep.weights is not None:
        module.net.load_state_dict(keep.weights)
    final = held_out(module, data)
    if module.curve[-1]["step"] != done:  # the budget ended between rounds: close the last one
        module.close_round(done, final)

    folder = save_network(module.net, network_config(spec, data), ctx.out_dir / "network")
    files = draw(spec, ctx, data, module, frames, keep.step if keep.weights is not None else None)
    metrics = summary(spec, data, module, before, final, done, per_epoch, keep.step, params)
    if spec.early_stopping is not None:
        metrics["train/stopped_early"] = float(stopped)
    files += write_results(ctx, metrics, module.curve)
    if spec.data.builtin == "max" and quiz(ctx, module):
        files.append(ctx.out_dir / "max_quiz.json")
    for path in files:
        ctx.log_artifact(path)
    ctx.log_artifact(folder, "network")
    print(f"{ctx.name}: {done} steps in {time.perf_counter() - started:.1f}s; held-out "
          f"{' '.join(f'{k}={v:.4g}' for k, v in before.items())} -> "
          f"{' '.join(f'{k}={v:.4g}' for k, v in final.items())}", flush=True)
    return StepOutput(outputs={"network": "network"}, metrics=metrics,
                      info={"task": data.task, "classes": data.classes, "features": data.feature_names,
                            "effort": effort(examples=data.train_rows, of="examples")})


def summary(spec: FeedforwardSpec, data: datasets.Data, module: FeedforwardModule, before: dict, final: dict,
            done: int, per_epoch: int, best_step: int, params: int) -> dict[str, float]:
    """The step's metrics (schemas/metrics.py, `feedforward`), `time/seconds` aside."""
    samples = _samples(done, per_epoch, spec.batch_size, data.train_rows)
    last_train = next((r for r in reversed(module.curve) if "train/loss" in r), {})
    metrics = {**final, **{f"before/{k}": v for k, v in before.items()},
               "val/best_loss": min(r["val/loss"] for r in module.curve), "val/best_epoch": best_step / per_epoch,
               **{k: v for k, v in last_train.items() if k.startswith("train/")},
               "train/steps": done, "train/samples": samples, "train/epochs": samples / data.train_rows,
               "data/train_rows": data.train_rows, "data/val_rows": len(data.val_y), "data/dropped_rows": data.dropped,
               "data/features": len(data.feature_names), "params/total": params}
    if data.task == "classification":
        metrics["data/classes"] = len(data.classes)
    return metrics


def write_results(ctx: StepContext, metrics: dict, curve: list[dict]) -> list:
    """metrics.json and curve.json in the step's folder."""
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (ctx.out_dir / "curve.json").write_text(json.dumps(curve) + "\n")
    return [ctx.out_dir / "metrics.json", ctx.out_dir / "curve.json"]


def _samples(done: int, per_epoch: int, batch_size: int, rows: int) -> int:
    """Training examples seen in `done` steps (each epoch's last batch may be short)."""
    epochs, rest = divmod(done, per_epoch)
    return epochs * rows + rest * batch_size


def network_config(spec: FeedforwardSpec, data: datasets.Data) -> dict:
    """What `load_network` needs to rebuild the network, and what its inputs and outputs mean."""
    net = spec.network
    return {"features": data.feature_names, "layers": list(net.layers), "activation": net.activation,
            "bias": net.bias, "dropout": net.dropout, "task": data.task, "classes": data.classes,
            "outputs": len(data.classes) if data.task == "classification" else 1,
            "source": spec.data.builtin or "csv"}


def draw(spec: FeedforwardSpec, ctx: StepContext, data: datasets.Data, module: FeedforwardModule,
         frames: pictures.Frames | None, best: int | None) -> list:
    """Write the loss curves and, for 2-D inputs, the final boundary and its frames; return their paths."""
    net = spec.network
    shape = f"{'-'.join(str(w) for w in net.layers)} {net.activation}" if net.layers else "no hidden layer"
    title = f"{ctx.name}: {spec.data.builtin or 'csv'}, {shape}, {spec.optimizer.name} " \
            f"lr={spec.optimizer.lr}, batch {spec.batch_size}"
    kept = "kept: best round" if spec.early_stopping else "best val/loss round"
    out = [pictures.save_curves(module.curve, ctx.out_dir / "loss_curve.png", title, best, data.task, kept)]
    if data.plane is None:
        return out
    final = module.curve[-1]
    score = f"held-out accuracy {final['val/accuracy']:.3f}" if "val/accuracy" in final else \
        f"held-out MSE {final['val/loss']:.2e}"
    surface = pictures.surface(module.net, data.plane, data.task)
    out.append(pictures.save_boundary(data.plane, surface, data.task, data.classes, f"{title}\n{score}",
                                      ctx.out_dir / "boundary.png"))
    if frames is not None and spec.frames:
        if frames.frames[-1]["step"] != final["step"]:
            frames.take(module.net, final["step"])
        unit = "samples" if data.streamed else "step"
        label = (lambda s: f"after {s * spec.batch_size:,} samples") if data.streamed else (lambda s: f"{unit} {s}")
        out += pictures.save_frames(data.plane, frames.frames, data.task, data.classes, label,
                                    ctx.out_dir / "boundary_frames.png", ctx.out_dir / "boundary_frames.gif")
    return out


def quiz(ctx: StepContext, module: FeedforwardModule) -> bool:
    """Print and log the learned units of the max quiz beside the course's max(a, b) = a + relu(b - a)."""
    rows = hidden_units(module.net, ["a", "b"])
    if rows is None:
        print(f"{ctx.name}: the max quiz's weights are shown for at most one hidden layer", flush=True)
        return False
    learned = " + ".join(r["term"] for r in rows).replace("+ -", "- ")
    course = ("max(a, b) = a + relu(b - a), or b + relu(a - b); for a >= 0, a = relu(a): "
              "1·relu(1a + 0b) + 1·relu(-1a + 1b)")
    print(f"{ctx.name}: course:  {course}\n{ctx.name}: learned: max(a, b) ≈ {learned}", flush=True)
    for row in rows:
        print(f"{ctx.name}:   {row['unit']}: w_a={row['w_a']:+.4f} w_b={row['w_b']:+.4f} "
              f"bias={row['bias']:+.4f} output weight={row['output_weight']:+.4f}", flush=True)
    ctx.log_table(rows, "max_quiz_weights.json")
    ctx.set_tags({"feedforward.course_formula": course, "feedforward.learned_formula": learned})
    report = {"course": course, "learned": learned, "units": rows}
    (ctx.out_dir / "max_quiz.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return True
