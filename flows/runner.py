"""Run one planned step from start to end: the lock on its fingerprint, its MLflow run, its process(es).

Shared by the pipeline's Prefect task and by `llmcycle step`. Light on purpose (no Prefect, no torch).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import schemas
from components.lib.context import StepResult
from components.lib.io import write_json_atomic
from flows import integrity, launch, sweeps, tracking
from flows.plan import RESULT_FILE, PlannedStep, run_dir
from flows.step import StepRequest


class StepFailed(RuntimeError):
    """A step failed; the message names the step and the cause in one paragraph."""


class StepStopped(RuntimeError):
    """A step was stopped (Ctrl-C, SIGTERM, cancelled in Prefect); its checkpoint is kept."""


class PipelineFailed(RuntimeError):
    """One or more steps failed; the message names every one of them. `ledger`: the run's (flows/ledger.py)."""

    def __init__(self, message: str, ledger: dict | None = None):
        super().__init__(message)
        self.ledger = ledger


class Stopper:
    """Why the pipeline is stopping, if it is: shared by the flow and its step tasks (threads)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._lock = threading.Lock()

    def stop(self, reason: str) -> None:
        with self._lock:
            self.reason = self.reason or reason

    def __call__(self) -> str | None:
        return self.reason


def step_lock(folder):
    """The lock on a step's fingerprint (a file in its run folder, so it works across processes and, on shared
    storage that honours locks, across machines)."""
    from filelock import FileLock

    return FileLock(str(folder / "lock"))


def try_lock(lock) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    return True


def claim(lock, record: Path, multi_node: bool, on_line, should_stop, name: str, ready=lambda: True,
          timeout: float | None = None) -> bool:
    """Take the step's lock (True: this process owns the step), or, for a multi-node step that another process
    already runs (its launch record exists), report that this process should join it (False).

    A single-node step held by another run is waited for (then its output is reused); `ready` says whether
    the step's inputs are complete (another machine's pipeline may still be making them).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    said = False
    while True:
        if ready() and try_lock(lock):
            return True
        if multi_node and record.is_file():
            return False
        if should_stop():
            raise StepStopped(f"step '{name}' stopped ({should_stop()}) while waiting for it to start")
        if deadline is not None and time.monotonic() > deadline:
            raise StepFailed(f"step '{name}' did not start within {timeout:.0f} s (trainer.launcher.join_timeout): "
                             "start `llmcycle run` (or `llmcycle step`) on the machine that owns it")
        if not said:
            on_line(f"{name}: another run is working on this step, or its inputs are not complete; waiting")
            said = True
        time.sleep(0.5)


def request_for(planned: PlannedStep, loaded: schemas.LoadedSpec, upstream: dict[str, StepResult], uri: str,
                **fields) -> StepRequest:
    return StepRequest(spec_path=str(loaded.path), overrides=list(loaded.overrides), name=planned.name,
                       kind=planned.kind, fingerprint=planned.fingerprint, output_dir=str(planned.output_dir),
                       workdir=str(loaded.workdir), resources=planned.resources,
                       tracking_uri="" if tracking.holds_secret(loaded) else uri,
                       upstream={n: {**r.to_json(), "dir": str(r.dir)} for n, r in upstream.items()},
                       **sweeps.request_fields(planned), **fields)


def join(planned: PlannedStep, loaded: schemas.LoadedSpec, upstream: dict[str, StepResult], uri: str,
         on_line, should_stop) -> launch.Outcome:
    """Run this machine's torchrun agent into a multi-node step another process owns (and logs)."""
    request = request_for(planned, loaded, upstream, uri, log_file=f"node-{socket.gethostname()}-{os.getpid()}.log")
    on_line(f"{planned.name}: joining as a further node (rendezvous "
            f"{planned.resources['launcher']['rdzv_endpoint']})")
    return launch.run_local(request, on_line, should_stop)


def execute_step(planned: PlannedStep, loaded: schemas.LoadedSpec, upstream: dict[str, StepResult], client,
                 parent_run_id: str, uri: str, on_line, should_stop, cuda_devices: str | None = None,
                 cpu_threads: int | None = None, in_process: bool = False, lock=None) -> StepResult:
    """Run one step (or reuse its complete output) in its nested MLflow run; raise StepFailed/StepStopped.

    `lock`: the step's lock, already held by the caller; by default it is claimed here: another run that holds
    it is waited for (and its output reused), or, for a multi-node step, joined as a further node.
    """
    if getattr(planned, "sweep", None) is not None:  # a swept step only picks among its variants' results, here in the flow
        return sweeps.select(planned, loaded, upstream, client, parent_run_id, on_line)
    began = time.time()  # the step's start-up in the ledger counts from here (components/lib/phases.py)
    folder = run_dir(loaded.workdir, planned.name, planned.fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "launch.json"
    multi_node = planned.resources.get("num_nodes", 1) > 1
    if lock is None:
        lock = step_lock(folder)
        if not claim(lock, record, multi_node, on_line, should_stop, planned.name):
            outcome = join(planned, loaded, upstream, uri, on_line, should_stop)
            if not outcome.ok:
                raise StepFailed(f"step '{planned.name}' ({planned.kind}) failed on this node: {outcome.message}")
            lock = step_lock(folder)
            lock.acquire()  # the owner releases it once it has logged the step; then reuse its output
    try:
        damaged = integrity.damage(planned.output_dir) if (planned.output_dir / RESULT_FILE).is_file() else ""
        if damaged:
            on_line(f"{planned.name}: its output is damaged ({damaged}); running the step again")
        reuse = (planned.output_dir / RESULT_FILE).is_file() and not damaged and not planned.forced
        if sweeps.is_trial(planned):  # its settings, from the Optuna study (under the lock: asked once)
            sweeps.ask(loaded, planned, reuse)
        run_id = tracking.start_step_run(loaded, client, parent_run_id, planned, cached=reuse)
        if reuse:
            result = StepResult.read(planned.output_dir)
            result.reused = True  # planned as cached, or made a moment ago by another run of the spec
            if sweeps.is_trial(planned):
                sweeps.tell(loaded, planned, result, on_line)  # a run stopped between its output and the tell
            tracking.finish_step_run(client, run_id, "ok", result.metrics)
            on_line(f"{planned.name}: complete output found in {planned.output_dir}, skipped")
            return result
        request = request_for(planned, loaded, upstream, uri, run_id=run_id, cuda_devices=cuda_devices,
                              cpu_threads=cpu_threads, launched_at=began)
        if multi_node:  # while it exists, the other nodes join (`llmcycle step`, or a pipeline that needs it)
            write_json_atomic(record, {"run_id": run_id})
        try:
            if planned.run_on:
                outcome = launch.run_on_pool(request, planned.run_on, on_line, should_stop)
            elif in_process:
                outcome = launch.run_inline(request, on_line, should_stop)
            else:
                outcome = launch.run_local(request, on_line, should_stop)
        except OSError as err:  # the engine's own files (the step's log, its request): a full disk, say
            outcome = launch.Outcome("failed", f"{err.strerror or err} ({err.filename or planned.output_dir})"
                                     + launch.disk_hint(planned.output_dir))
        result = StepResult.read(planned.output_dir) if outcome.ok else None
        if result is not None and sweeps.is_trial(planned):
            sweeps.tell(loaded, planned, result, on_line)
        tracking.finish_step_run(client, run_id, outcome.status, result.metrics if result else None,
                                 error=outcome.message, log=request.log_path, trace=outcome.trace)
    finally:
        record.unlink(missing_ok=True)
        lock.release()
    if outcome.status == "stopped":
        raise StepStopped(f"step '{planned.name}' ({planned.kind}) {outcome.message}")
    if not outcome.ok:
        raise StepFailed(f"step '{planned.name}' ({planned.kind}) failed: {outcome.message}")
    return result
