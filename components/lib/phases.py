"""Where a step's wall time goes: start-up, data, logging, and compute (the rest), for the run's ledger.

The engine (flows/step.py) starts the clock when the step's process begins its work (`reset`) and stores
`spent(wall, launch)` in the step's result, where flows/ledger.py shows the split. Code charges a block to a phase:

- `startup`: the engine's launch of the step (its lock, MLflow run, the fork or torchrun and interpreter start),
  the step reading the spec and building its context, importing the component, and every model built or loaded
  (components/lib/models.py, components/lib/rewards.py);
- `data`: checking the data files' rows (the engine), and Lightning's data fetching (the `*_next` actions of
  its training and evaluation loops) and DataModule hooks, through `lightning_profiler()`;
- `logging`: every MLflow call of the step (components/lib/context.py, Lightning's logger, logging a model)
  and its writes of models and checkpoints;
- `compute`: the rest of the step's wall time: its own loops (forward, backward, optimizer, generation).

A block inside another is charged to the inner phase and left out of the outer one (self time, as profilers
count it), so phases never overlap and they add up to the wall time. Only the thread that started the step
charges: work in a helper thread overlaps that thread's and would be counted twice. Standard library only:
the engine and StepContext import it before torch.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time

PHASES = ("startup", "data", "compute", "logging")
CHARGED = ("startup", "data", "logging")  # compute is what is left
# Lightning profiler actions (lightning.pytorch.loops, trainer/call.py) and the phase they are charged to.
LIGHTNING_ACTIONS = {"train_dataloader_next": "data", "val_next": "data", "test_next": "data",
                     "predict_next": "data", "[LightningDataModule]": "data", "save_checkpoint": "logging"}

_spent: dict[str, float] = dict.fromkeys(CHARGED, 0.0)
_stack: list[list] = []  # open charges, innermost last: [phase, start, seconds of charged blocks inside]
_owner = threading.main_thread().ident  # the thread whose time is charged: the one that called reset()


def reset() -> None:
    """Forget what was charged (a step starts in this process, in this thread)."""
    global _owner
    _owner = threading.get_ident()
    _spent.update(dict.fromkeys(CHARGED, 0.0))
    _stack.clear()


def begin(phase: str) -> list | None:
    """Open a charge to `phase`; returns its token for `end` (None in a helper thread, which charges nothing)."""
    if phase not in CHARGED:
        raise ValueError(f"phase '{phase}': expected one of {', '.join(CHARGED)} (compute is what is left)")
    if threading.get_ident() != _owner:
        return None
    frame = [phase, time.perf_counter(), 0.0]
    _stack.append(frame)
    return frame


def end(token: list | None) -> None:
    """Close the charge `token` opened (and any left open inside it): its self time goes to its phase."""
    if token is None or not any(f is token for f in _stack):
        return
    now = time.perf_counter()
    while _stack:
        frame = _stack.pop()
        phase, start, inner = frame
        elapsed = now - start
        _spent[phase] += max(0.0, elapsed - inner)
        if _stack:
            _stack[-1][2] += elapsed
        if frame is token:
            return


@contextlib.contextmanager
def charge(phase: str):
    """Charge the block's wall time (less what blocks inside it charge) to `phase`."""
    token = begin(phase)
    try:
        yield
    finally:
        end(token)


def charged(phase: str):
    """Decorate a function so that each call is charged to `phase`."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with charge(phase):
                return fn(*args, **kwargs)
        return call
    return wrap


def spent(wall: float, launch: float = 0.0) -> dict[str, float]:
    """Seconds per phase of a step whose process worked `wall` seconds, `launch` seconds after the engine began it
    (its lock, MLflow run and process start, which count as start-up): what was charged, compute the rest. The
    phases add up to `launch + wall`; `launch` is also given on its own."""
    out = {p: round(_spent[p], 3) for p in CHARGED}
    out["compute"] = round(max(0.0, wall - sum(_spent.values())), 3)
    out["startup"] = round(out["startup"] + launch, 3)
    return {**{p: out[p] for p in PHASES}, "launch": round(launch, 3)}


def lightning_profiler():
    """A Lightning Profiler that charges the fit's data fetching to `data` and its checkpoints to `logging`.

    Lightning already wraps these in profiler actions (SimpleProfiler reports them as
    `[_TrainingEpochLoop].train_dataloader_next` etc.); this one only books their time into the phases.
    """
    from lightning.pytorch.profilers import Profiler

    class PhaseProfiler(Profiler):
        def __init__(self) -> None:
            super().__init__()
            self.open: dict[str, list] = {}

        def start(self, action_name: str) -> None:
            phase = _lightning_phase(action_name)
            if phase is not None:
                self.open[action_name] = begin(phase)

        def stop(self, action_name: str) -> None:
            end(self.open.pop(action_name, None))

    return PhaseProfiler()


def _lightning_phase(action: str) -> str | None:
    for key, phase in LIGHTNING_ACTIONS.items():
        if action.endswith(key) or action.startswith(key):
            return phase
    return None
