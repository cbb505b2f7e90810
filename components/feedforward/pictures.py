"""Pictures: the decision boundary (or the coastline map) over a 2-D plane, frames of it through training, and
the loss curves. Frames are taken by a Lightning callback; drawing happens once, after training."""

from __future__ import annotations

import io
from collections import deque
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .data import Plane

GRID = 90  # grid points per axis of a picture
RECENT = 200  # the stream's last samples shown on a frame (a bounded buffer, like the learner's memory)
PLAYGROUND_COLOURS = ("#f59322", "#0877bd")  # Playground's orange (-1) and blue (+1)
MAP_COLOURS = ("#2c7fb8", "#7fbf7b")  # sea, land


def grid(plane: Plane, size: int = GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xs, ys, points (size², 2)) covering the plane's bounds."""
    (x0, x1), (y0, y1) = plane.bounds
    xs, ys = np.linspace(x0, x1, size), np.linspace(y0, y1, size)
    gx, gy = np.meshgrid(xs, ys)
    return xs, ys, np.c_[gx.ravel(), gy.ravel()]


@torch.no_grad()
def surface(net: torch.nn.Module, plane: Plane, task: str, size: int = GRID) -> np.ndarray:
    """The network over the grid (size, size): p(class 1) for two classes, the class index for more, the value
    for regression."""
    _, _, points = grid(plane, size)
    training = net.training
    net.eval()
    param = next(net.parameters())
    out = net(torch.as_tensor(plane.inputs(points), dtype=param.dtype, device=param.device)).float().cpu()
    net.train(training)
    if task == "regression":
        values = out.squeeze(-1)
    elif out.shape[-1] == 2:
        values = out.softmax(-1)[:, 1]
    else:
        values = out.argmax(-1).float()
    return values.numpy().reshape(size, size)


class Frames(Callback):
    """Take the network's surface at chosen optimizer steps; on a stream, keep the last RECENT samples for each
    frame (the buffer is bounded: the stream itself is never kept)."""

    def __init__(self, plane: Plane, task: str, at: list[int], streamed: bool):
        self.plane, self.task, self.at, self.streamed = plane, task, set(at), streamed
        self.frames: list[dict] = []  # step, surface, recent points
        self.recent: deque = deque(maxlen=RECENT)

    def take(self, net: torch.nn.Module, step: int) -> None:
        recent = np.array(self.recent) if self.recent else None
        self.frames.append({"step": step, "surface": surface(net, self.plane, self.task), "recent": recent})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.streamed:
            x, y = batch
            points = self.plane.from_inputs(x.detach().cpu().numpy())
            self.recent.extend(zip(points[:, 0], points[:, 1], y.cpu().numpy()))
        step = trainer.global_step
        if step in self.at and not any(f["step"] == step for f in self.frames):
            self.take(module.net, step)

    def state_dict(self) -> dict:
        return {"frames": [{"step": f["step"], "surface": torch.from_numpy(f["surface"]),
                            "recent": None if f["recent"] is None else torch.from_numpy(f["recent"])}
                           for f in self.frames]}

    def load_state_dict(self, state: dict) -> None:
        self.frames = [{"step": f["step"], "surface": f["surface"].numpy(),
                        "recent": None if f["recent"] is None else f["recent"].numpy()} for f in state["frames"]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(ax, plane: Plane, values: np.ndarray, task: str, classes: list[str] | None, title: str,
         recent: np.ndarray | None = None) -> None:
    """One picture: the surface as colour, the held-out points (and the training points, or the stream's last
    samples) on top, and the true boundary where the data have one."""
    from matplotlib.colors import LinearSegmentedColormap, ListedColormap

    xs, ys, points = grid(plane, values.shape[0])
    mapped = plane.truth is not None
    colours = MAP_COLOURS if mapped else PLAYGROUND_COLOURS
    if task == "regression":
        image = ax.pcolormesh(xs, ys, values, cmap="viridis", shading="auto")
        ax.figure.colorbar(image, ax=ax, fraction=0.046)
        point_colour = dict(c=plane.val_labels, cmap="viridis", vmin=values.min(), vmax=values.max())
    elif classes and len(classes) == 2:
        cmap = LinearSegmentedColormap.from_list("two", [colours[0], "#ffffff", colours[1]])
        ax.pcolormesh(xs, ys, values, cmap=cmap, vmin=0, vmax=1, shading="auto", alpha=0.85)
        ax.contour(xs, ys, values, levels=[0.5], colors="#333333", linewidths=0.8)
        point_colour = dict(c=[colours[int(v)] for v in plane.val_labels])
    else:
        cmap = ListedColormap([f"C{i}" for i in range(len(classes or [0]))])
        ax.pcolormesh(xs, ys, values, cmap=cmap, vmin=-0.5, vmax=len(classes or [0]) - 0.5, shading="auto", alpha=0.35)
        point_colour = dict(c=plane.val_labels, cmap=cmap, vmin=-0.5, vmax=len(classes or [0]) - 0.5)
    if mapped:
        truth = plane.truth(points).reshape(values.shape)
        ax.contour(xs, ys, truth, levels=[0.5], colors="#000000", linewidths=1.2, linestyles="--")
    if plane.train_points is not None:
        train_colour = dict(point_colour, c=[colours[int(v)] for v in plane.train_labels]) \
            if "cmap" not in point_colour else dict(point_colour, c=plane.train_labels)
        ax.scatter(*plane.train_points.T, s=10, edgecolors="white", linewidths=0.4, **train_colour)
        ax.scatter(*plane.val_points.T, s=10, edgecolors="black", linewidths=0.4, marker="s", **point_colour)
    if recent is not None and len(recent):
        ax.scatter(recent[:, 0], recent[:, 1], s=9, c=[colours[int(v)] for v in recent[:, 2]],
                   edgecolors="black", linewidths=0.3)
    ax.set_xlim(*plane.bounds[0])
    ax.set_ylim(*plane.bounds[1])
    ax.set_xlabel(plane.axes[0])
    ax.set_ylabel(plane.axes[1])
    ax.set_title(title, fontsize=9)


def save_boundary(plane: Plane, values: np.ndarray, task: str, classes, title: str, path: Path) -> Path:
    """The final picture as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    draw(ax, plane, values, task, classes, title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_frames(plane: Plane, frames: list[dict], task: str, classes, label, png: Path, gif: Path) -> list[Path]:
    """The frames side by side (a PNG strip) and one after the other (an animated GIF, 0.7 s a frame)."""
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 3.2), squeeze=False)
    images = []
    for ax, frame in zip(axes[0], frames):
        draw(ax, plane, frame["surface"], task, classes, label(frame["step"]), frame["recent"])
        one, single = plt.subplots(figsize=(4.6, 4.2))
        draw(single, plane, frame["surface"], task, classes, label(frame["step"]), frame["recent"])
        one.tight_layout()
        buffer = io.BytesIO()
        one.savefig(buffer, format="png", dpi=80)
        plt.close(one)
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    images[0].save(gif, save_all=True, append_images=images[1:], duration=700, loop=0)
    return [png, gif]


def save_curves(curve: list[dict], path: Path, title: str, best_step: int | None, task: str,
                best_label: str = "best round") -> Path:
    """Training and held-out loss by optimizer step (and held-out accuracy or MAE beside it) as a PNG."""
    plt = _pyplot()
    second = "val/accuracy" if task == "classification" else "val/mae"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        points = [(r["step"], r[key]) for r in curve if key in r]
        if points:
            left.plot(*zip(*points), style, markersize=3, label=key)
    left.set_ylabel("cross-entropy (nats)" if task == "classification" else "mean squared error")
    points = [(r["step"], r[second]) for r in curve if second in r]
    right.plot(*zip(*points), "o-", markersize=3, color="C2", label=second)
    right.set_ylabel(second)
    for ax in (left, right):
        if best_step is not None:
            ax.axvline(best_step, color="#888888", linestyle=":", label=best_label)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    if min(r[k] for r in curve for k in ("train/loss", "val/loss") if k in r) > 0:
        left.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
