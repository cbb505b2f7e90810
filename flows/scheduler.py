"""Which steps may start now: their inputs are complete, fewer than `max_parallel` run, their devices are free.

Pure bookkeeping (no Prefect, no processes), so the rules can be tested directly. Devices are the GPUs the
engine sees and the CPU: a step holds the GPUs it trains on, or the CPU when it has no GPU. A device serves
one step at a time unless the steps set `share_devices` (two CPU-bound steps at once on a laptop take
longer together than one after the other; measured in the README), and steps sharing the CPU split its
cores. A step whose upstream failed is skipped, while the independent branches go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from schemas.resources import TrainerSpec

CPU = "cpu"


@dataclass
class Start:
    """A step to start now, with what it holds."""

    step: object  # PlannedStep
    cuda_devices: str | None  # CUDA_VISIBLE_DEVICES (None: no GPU)
    cpu_threads: int | None  # torch threads when it shares the CPU (None: torch's default)


@dataclass
class Scheduler:
    steps: list  # PlannedStep, in dependency order
    max_parallel: int
    gpus: list[str] = field(default_factory=list)  # device ids visible to the engine
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    running: dict[str, tuple[list[str], bool]] = field(default_factory=dict)  # step -> (devices held, shared)

    def __post_init__(self) -> None:
        self.waiting = [s for s in self.steps if s.selected]
        short = [self._too_few(s) for s in self.waiting if s.will_run]
        if any(short):
            raise ValueError("; ".join(m for m in short if m))

    @property
    def finished(self) -> bool:
        return not self.waiting and not self.running

    def start(self) -> list[Start]:
        """Steps to start now; marks them running."""
        started = []
        for step in list(self.waiting):
            if any(d in self.failed or d in self.skipped for d in step.deps):
                self.waiting.remove(step)
                self.skipped.add(step.name)
                continue
            if len(self.running) >= self.max_parallel or not all(d in self.done for d in step.deps):
                continue
            claim = self.claim(step)
            if claim is None:
                continue
            self.waiting.remove(step)
            shared = self._resources(step).share_devices
            self.running[step.name] = (claim, shared)
            gpus = [d for d in claim if d != CPU]
            threads = None
            if CPU in claim and shared:
                on_cpu = sum(1 for held, _ in self.running.values() if CPU in held)
                threads = max(1, self.cores // on_cpu)
            started.append(Start(step, ",".join(gpus) if gpus else None, threads))
        return started

    def end(self, name: str, ok: bool) -> None:
        self.running.pop(name, None)
        (self.done if ok else self.failed).add(name)

    def _resources(self, step) -> TrainerSpec:
        return TrainerSpec.model_validate(step.resources)

    def needs(self, step) -> int:
        """GPUs the step holds on this machine (0: it runs on the CPU, or elsewhere)."""
        resources = self._resources(step)
        if step.run_on is not None or not resources.wants_gpu(len(self.gpus)):
            return 0
        return len(resources.device_ids() or []) or resources.device_count() or len(self.gpus)

    def _too_few(self, step) -> str:
        need = self.needs(step)
        wanted = [str(i) for i in self._resources(step).device_ids() or []]
        if need and (need > len(self.gpus) or any(d not in self.gpus for d in wanted)):
            asked = f"GPUs {','.join(wanted)}" if wanted else f"{need} GPU(s)"
            return (f"step '{step.name}' asks for {asked} and this machine shows {len(self.gpus)} "
                    f"({','.join(self.gpus) or 'none'}); change its trainer.devices, or run it elsewhere with run_on")
        return ""

    def claim(self, step) -> list[str] | None:
        """The devices for the step, or None while they are busy."""
        if step.run_on is not None or step.cached and not step.forced or getattr(step, "sweep", None):
            return []  # runs elsewhere, or only reads complete outputs (its own, or a sweep's variants')
        need, shared = self.needs(step), self._resources(step).share_devices
        if need == 0:
            return [CPU] if self._free(CPU, shared) else None
        wanted = [str(i) for i in self._resources(step).device_ids() or []] or self.gpus
        free = [d for d in wanted if self._free(d, shared)]
        return free[:need] if len(free) >= need else None

    def _free(self, device: str, shared: bool) -> bool:
        holders = [s for held, s in self.running.values() if device in held]
        return not holders if not shared else all(holders)
