"""Pieces every training kind shares: optimizer and schedule, the Lightning Trainer, resume, guards.

The Trainer is built here once so that precision, devices, strategy, checkpointing, the NaN guard and
the MLflow logger behave the same in pretrain, finetune, reward_model and dpo.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from components.lib import phases
from components.lib.context import StepContext
from schemas.base import OptimizerSpec, ScheduleSpec, TrainingLoop

DEFAULT_STEPS = 100  # when a step gives neither max_steps nor max_tokens

# Lightning's start-up notices (GPU/TPU availability, precision, an advert) reach the terminal twice under
# Prefect's log capture; make_trainer prints the one line that matters instead.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX lets autocast run bf16 matmuls about 2x faster than fp32 on CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Map `auto` to the fastest safe precision on this hardware (bf16-mixed where it is fast)."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def world_size() -> int:
    """Processes training this step together: torchrun's WORLD_SIZE, or 1 for a step in one process."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def total_steps(loop: TrainingLoop, tokens_per_step: int) -> int:
    """Optimizer steps implied by max_steps or max_tokens."""
    if loop.max_steps is not None:
        return loop.max_steps
    if loop.max_tokens is not None:
        return max(1, math.ceil(loop.max_tokens / max(tokens_per_step, 1)))
    return DEFAULT_STEPS


def lr_lambda(schedule: ScheduleSpec, peak_lr: float, steps: int):
    """Linear warmup to the peak, then cosine/linear/constant decay to min_lr (as a multiplier)."""
    floor = schedule.min_lr / peak_lr

    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / (schedule.warmup_steps + 1)
        if schedule.decay == "constant":
            return 1.0
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, steps - schedule.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def configure_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], optimizer: dict | OptimizerSpec,
                        schedule: dict | ScheduleSpec, steps: int) -> dict:
    """Optimizer (no weight decay on biases and norms, as in GPT-2/nanoGPT) with a per-step LR schedule.

    `optimizer` and `schedule` are the spec's sections or their plain dicts (as LightningModules keep them in
    their hyperparameters)."""
    optimizer, schedule = OptimizerSpec.model_validate(optimizer), ScheduleSpec.model_validate(schedule)
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if optimizer.name == "sgd":
        opt = torch.optim.SGD(groups, lr=optimizer.lr, momentum=optimizer.momentum)
    else:
        cls = torch.optim.AdamW if optimizer.name == "adamw" else torch.optim.Adam
        # The fused kernel (CPU and CUDA) is ~3x faster per step than the default multi-tensor one, and it is
        # what transformers' Trainer picks by default; fall back where a device or dtype lacks it.
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        opt = cls(groups, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, optimizer.lr, steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepLogger(MLFlowLogger):
    """Lightning's MLflow logger on the step's run. Hyperparameters are not logged here: the engine
    already logged the step's settings as params, and MLflow refuses a param logged twice."""

    def log_hyperparams(self, params) -> None:  # noqa: D102
        return None

    @property
    def experiment(self):
        """Lightning's client, created without leaving MLflow's process-wide tracking URI (and the
        MLFLOW_TRACKING_URI it exports) pointing at this step's store."""
        from components.lib.mlflow_models import tracking_to

        with tracking_to(self._tracking_uri):
            return super().experiment

    def finalize(self, status: str = "success") -> None:  # the engine ends the run, not Lightning
        return None

    def log_metrics(self, metrics, step=None) -> None:  # noqa: D102 - charged to the ledger's logging phase
        with phases.charge("logging"):
            super().log_metrics(metrics, step)


class ClipGradNorm(Callback):
    """Clip the global gradient norm just before each optimizer step (gradients are unscaled by then).

    Lightning's own `gradient_clip_val` refuses fused optimizers under mixed precision, although bf16 has no
    loss scaler to conflict with; clipping here keeps the fused AdamW kernel usable.
    """

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


class NanGuard(Callback):
    """Stop with a message naming the step and the global step when the loss is not finite."""

    def __init__(self, step_name: str):
        self.step_name = step_name

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            raise FloatingPointError(f"step '{self.step_name}': loss became {float(loss)} at global step "
                                     f"{trainer.global_step}; lower optimizer.lr, set grad_clip, or use "
                                     "precision 32-true")


class CheckpointOnStop(Callback):
    """Save `last.ckpt` when the step is stopped (Ctrl-C, SIGTERM from the engine), so the next run resumes
    from where it stopped rather than from the last periodic checkpoint. Other exceptions save nothing:
    resuming into the state that raised (a NaN, a bug) would only raise again."""

    def __init__(self, ckpt_dir: Path):
        self.path = Path(ckpt_dir) / "last.ckpt"

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            self.path.unlink(missing_ok=True)  # may be a link to a periodic checkpoint; never write through it
            trainer.save_checkpoint(str(self.path))
            print(f"saved a checkpoint at step {trainer.global_step}: {self.path}", flush=True)


class Throughput(Callback):
    """Log tokens/s and achieved FLOP/s (6·N·tokens/s for training, Kaplan et al. 2020), over the time from
    the first training batch to the last one, less the validation rounds in between."""

    def __init__(self, params: int, every: int = 10):
        self.params, self.every = params, every
        self.tokens = 0
        self.start = self.end = self.val_start = None
        self.paused = 0.0

    def summary(self) -> dict[str, float]:
        """`perf/tokens_per_s` and `perf/flops_per_s` over this fit (empty when no batch ran)."""
        elapsed = self.end - self.start - self.paused if self.start and self.end else 0.0
        if not self.tokens or elapsed <= 0:
            return {}
        rate = self.tokens / elapsed
        return {"perf/tokens_per_s": rate, "perf/flops_per_s": 6 * self.params * rate}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.tokens += int(getattr(module, "tokens_in_batch", 0)) * trainer.world_size
        if trainer.global_step % self.every == 0 and (rates := self.summary()):
            module.log_dict(rates, rank_zero_only=True)

    def on_validation_start(self, trainer, module) -> None:
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if self.start is not None and self.val_start is not None:  # not the sanity check before training
            self.paused += time.perf_counter() - self.val_start


class PrintProgress(Callback):
    """Progress lines for logs and CI, where a live progress bar would only add noise."""

    def __init__(self, step_name: str, total: int, every: int | None = None):
        self.step_name, self.total = step_name, total
        self.every = every or max(1, total // 10)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == self.total) and \
                getattr(self, "_last", None) != step:
            self._last = step
            m = trainer.callback_metrics
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in m.items() if k in ("train/loss", "val/loss"))
            print(f"{self.step_name}: step {step}/{self.total} {shown} ({time.perf_counter() - self.start:.0f}s)",
                  flush=True)


def make_trainer(ctx: StepContext, loop: TrainingLoop, steps: int, params: int = 0,
                 callbacks: list[Callback] | None = None, validate: bool = True, manual: bool = False) -> L.Trainer:
    """The Trainer of every kind that trains: its devices and precision, checkpoints in ctx.ckpt_dir (every
    `checkpoint_every` optimizer steps, and on a stop), the NaN guard, throughput, MLflow logging, progress.

    `manual`: the module steps its optimizer itself (PPO) and clips its own gradients; `callbacks` then
    replace the progress printer.
    """
    ctx.ckpt_dir.mkdir(parents=True, exist_ok=True)
    cbs: list[Callback] = [
        ModelCheckpoint(dirpath=ctx.ckpt_dir, filename="step-{step}", every_n_train_steps=min(loop.checkpoint_every, steps),
                        save_top_k=1, monitor="step", mode="max", save_last=True),
        NanGuard(ctx.name),
        Throughput(params),
        CheckpointOnStop(ctx.ckpt_dir),
    ]
    if loop.grad_clip and not manual:
        cbs.append(ClipGradNorm(loop.grad_clip))
    if loop.early_stopping is not None and validate:
        cbs.append(EarlyStopping(monitor="val/loss", patience=loop.early_stopping.patience,
                                 min_delta=loop.early_stopping.min_delta, check_on_train_epoch_end=False))
    tty = sys.stdout.isatty() and not manual
    if tty:
        from lightning.pytorch.callbacks import RichProgressBar

        cbs.append(RichProgressBar())
    elif not manual:
        cbs.append(PrintProgress(ctx.name, steps))
    cbs += callbacks or []
    if ctx.trial is not None and validate:  # a sweep's Optuna trial with pruning (flows/sweeps.py)
        from components.lib.trials import PruneTrial

        cbs.append(PruneTrial(ctx.trial))
    logger = StepLogger(run_id=ctx.run_id, tracking_uri=ctx.tracking_uri) if ctx.run_id else False
    t = ctx.trainer
    precision = resolve_precision(t.precision, t.accelerator)
    print(f"{ctx.name}: {steps} optimizer steps, precision {precision}, accelerator {t.accelerator}, "
          f"devices {t.devices} x {t.num_nodes} node(s), strategy {t.strategy}", flush=True)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=precision, max_steps=steps, max_epochs=-1,
        accumulate_grad_batches=1 if manual else loop.accumulate,
        val_check_interval=loop.val_every * loop.accumulate if validate else None,
        check_val_every_n_epoch=None, limit_val_batches=loop.val_batches if validate else 0,
        num_sanity_val_steps=0, logger=logger, callbacks=cbs, enable_progress_bar=tty,
        enable_model_summary=False, log_every_n_steps=1 if manual else max(1, min(10, steps // 10)),
        default_root_dir=str(ctx.ckpt_dir), benchmark=False,
        profiler=phases.lightning_profiler())  # data fetching and checkpoints, for the ledger's split of time


def perf_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The throughput of the last fit (`perf/tokens_per_s`, `perf/flops_per_s`), and `perf/compile_speedup` when
    `compile: auto` timed a compiled step (the eager step's time over the compiled one's, kept or not)."""
    metrics = next((cb.summary() for cb in trainer.callbacks if isinstance(cb, Throughput)), {})
    auto = next((cb for cb in trainer.callbacks if isinstance(cb, AutoCompile) and cb.speedup), None)
    return {**metrics, "perf/compile_speedup": auto.speedup} if auto else metrics


def last_checkpoint(ctx: StepContext) -> str | None:
    """The newest intact checkpoint of this very fingerprint, if a previous attempt left one: `last.ckpt`, else
    the newest periodic one. A checkpoint cut short (a full disk, a kill during the write) is not a whole zip
    archive (torch.save's format); it is skipped with a note, never resumed from."""
    import re
    import zipfile

    periodic = sorted(ctx.ckpt_dir.glob("step-step=*.ckpt"),
                      key=lambda p: int(re.findall(r"\d+", p.name)[-1]), reverse=True)
    for path in [ctx.ckpt_dir / "last.ckpt", *periodic]:
        if not path.is_file():
            continue
        if zipfile.is_zipfile(path):
            return str(path)
        print(f"{ctx.name}: {path} is damaged (cut short by a full disk or a kill?); not resuming from it",
              flush=True)
    return None


# `compile: auto` measures before it decides and after. benchmarks/bench_compile.py (2-core CPU, idle, 2026-12-02)
# found the gain to depend on the model: a 2x128 Llama's pretrain step ran 1.24x faster compiled (24 s compile),
# a 4x256 one's 1.01x (37 s); a finetune step, whose batch shape changes batch to batch, recompiled each time
# and ran at 0.11x. So no fixed speed-up is assumed: `auto` tries a compile only when its cost is a small share
# of the time left (COMPILE_BUDGET), times the compiled steps, and goes back to eager when they are not faster.
# The most a try can lose is then that share; what it gains is measured.
COMPILE_PROBE_STEPS = 20
"""`auto` times this many optimizer steps eagerly (after the first), and as many compiled, before deciding."""
COMPILE_BUDGET = 0.05
"""The share of the remaining (eager) training time that `auto` risks on a compile that may not pay."""
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}
"""The one-off compile time `auto` expects, by device (measured: 24-37 s on this CPU, idle)."""
COMPILE_KEEP = 0.97
"""The compiled steps are kept when they take at most this share of the eager step's time."""


def should_compile(setting: bool | str, fixed_shapes: bool, generates: bool = False) -> bool | None:
    """Whether `trainer.compile` compiles a step: True, False, or None for "measure first" (`auto` on a kind
    whose batches keep one shape, pretrain: `AutoCompile` decides after timing the first steps). `auto` never
    compiles batches of changing shapes (each shape recompiles) nor the kinds that generate with the model they
    train (ppo, grpo: each rollout length would recompile)."""
    if setting != "auto":
        return bool(setting)
    return None if fixed_shapes and not generates else False


def worth_trying(step_seconds: float, steps_left: int, device: str) -> bool:
    """Whether a compile costs at most COMPILE_BUDGET of the eager time left, so that trying it is cheap even
    when the compiled step turns out no faster."""
    return expected_compile_seconds(device) <= COMPILE_BUDGET * step_seconds * steps_left


def expected_compile_seconds(device: str) -> float:
    """COMPILE_SECONDS for a torch device type (every non-CUDA device counts as a CPU)."""
    return COMPILE_SECONDS["cuda" if device == "cuda" else "cpu"]


def compile_trained(module: L.LightningModule) -> list[str]:
    """Compile, in place, each network of the module that has trainable parameters (`nn.Module.compile`: the
    parameter names and the state dict stay as they are, so checkpoints and saved folders do not change)."""
    names = []
    for name, child in module.named_children():
        if any(p.requires_grad for p in child.parameters()):
            child.compile()
            names.append(name)
    return names


def uncompile(module: L.LightningModule, names: list[str]) -> None:
    """Undo `compile_trained`: the networks run eagerly again. (`nn.Module.compile` keeps the compiled call
    in `_compiled_call_impl` and uses it while it is set; torch has no public way back.)"""
    for name in names:
        getattr(module, name)._compiled_call_impl = None


class AutoCompile(Callback):
    """`compile: auto` on a fixed-shape kind, in three phases (printing each decision):

    1. time optimizer steps 2..COMPILE_PROBE_STEPS+1 eagerly; compile when `worth_trying` at that pace;
    2. let the next step compile (its time is the compile's), then time COMPILE_PROBE_STEPS compiled steps;
    3. keep the compiled networks when their step is faster (COMPILE_KEEP), else go back to eager.
    `decision` ends as "eager" (never tried), "compiled" or "reverted"; `speedup` is the measured ratio."""

    def __init__(self, step_name: str):
        self.step_name, self.phase, self.started, self.first = step_name, "eager", None, 0
        self.decision, self.speedup, self.eager_pace, self.names = None, None, None, []

    def _timed(self, trainer) -> float | None:
        """The pace (s/step) of the steps since this phase's clock started, once COMPILE_PROBE_STEPS ran."""
        if self.started is None:
            self.started, self.first = time.perf_counter(), trainer.global_step
            return None
        done = trainer.global_step - self.first
        return (time.perf_counter() - self.started) / done if done >= COMPILE_PROBE_STEPS else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.decision or trainer.global_step < 1:
            return
        if self.phase == "compiling":  # the step that just ran compiled: the compiled clock starts now
            self.phase = "compiled"
        pace = self._timed(trainer)
        if pace is None:
            return
        left, device = trainer.max_steps - trainer.global_step, module.device.type
        if self.phase == "eager":
            self.eager_pace = pace
            if not worth_trying(pace, left, device):
                self.decision = "eager"
                print(f"{self.step_name}: compile auto: {left} steps left at {pace:.3f} s/step; a compile "
                      f"(about {expected_compile_seconds(device):.0f} s) would risk more "
                      f"than {COMPILE_BUDGET:.0%} of that; staying eager", flush=True)
                return
            self.names, self.phase, self.started = compile_trained(module), "compiling", None
            print(f"{self.step_name}: compile auto: {left} steps left at {pace:.3f} s/step; compiling "
                  f"{', '.join(self.names)} and timing it", flush=True)
            return
        self.speedup = self.eager_pace / pace
        if pace <= COMPILE_KEEP * self.eager_pace:
            self.decision = "compiled"
            print(f"{self.step_name}: compile auto: compiled steps {self.speedup:.2f}x as fast "
                  f"({pace:.3f} s/step); keeping them", flush=True)
        else:
            uncompile(module, self.names)
            self.decision = "reverted"
            print(f"{self.step_name}: compile auto: compiled steps only {self.speedup:.2f}x as fast "
                  f"({pace:.3f} s/step); back to eager", flush=True)


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule=None, ctx: StepContext | None = None,
        fixed_shapes: bool = False, **loaders) -> None:
    """Fit, resuming from this fingerprint's last checkpoint when one exists, compiling the trained networks
    when `trainer.compile` says so (`fixed_shapes`: every batch has one shape, which `auto` requires)."""
    if ctx is not None:
        decision = should_compile(ctx.trainer.compile, fixed_shapes, generates=not module.automatic_optimization)
        if decision:
            print(f"{ctx.name}: compiling {', '.join(compile_trained(module))} (torch.compile; the first step "
                  "is slow)", flush=True)
        elif decision is None:
            trainer.callbacks.append(AutoCompile(ctx.name))
    ckpt = last_checkpoint(ctx) if ctx is not None else None
    if ckpt:
        print(f"{ctx.name}: resuming from {ckpt}", flush=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, **loaders)  # no pickled code


def sum_over_ranks(module: L.LightningModule, *values: float) -> list[float]:
    """Each value summed over the processes of a distributed run (itself on one process): the sums and counts
    behind a held-out mean, so that the mean covers every rank's share of the data."""
    stats = torch.tensor([float(v) for v in values], dtype=torch.float64, device=module.device)
    if module.trainer.world_size > 1:
        stats = module.trainer.strategy.reduce(stats, reduce_op="sum")
    return [float(v) for v in stats]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
