"""The Prefect flow: validate, plan, then run the steps, several at once when their inputs are complete.

The flow process stays light: each step runs in a process of its own (flows/launch.py), so memory does
not pile up from step to step and a step that dies takes only itself down. Step outputs are cached by
fingerprint (flows/plan.py), not by Prefect's cache, because the key must cover input file contents and
upstream fingerprints and must survive a server reset.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import schemas  # noqa: E402
from components.lib.context import StepResult  # noqa: E402
from flows import launch, ledger, tracking  # noqa: E402
from flows.plan import PlannedStep, make_plan  # noqa: E402
from flows.runner import PipelineFailed, StepFailed, Stopper, StepStopped, execute_step  # noqa: E402
from flows.scheduler import Scheduler, Start  # noqa: E402

CANCEL_POLL_S = 2.0


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with exc_info set but no exception, which prints
    "NoneType: None" under the message; the message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoEmptyTraceback())


@task(cache_policy=NO_CACHE)
def run_step(planned: PlannedStep, loaded: schemas.LoadedSpec, upstream: dict[str, StepResult], client,
             parent_run_id: str, uri: str, start: Start, stopper: Stopper, in_process: bool = False) -> StepResult:
    """One step: its own process(es), its output folder, its nested MLflow run."""
    from prefect.states import Cancelled, Failed

    try:
        return execute_step(planned, loaded, upstream, client, parent_run_id, uri, get_run_logger().info, stopper,
                            cuda_devices=start.cuda_devices, cpu_threads=start.cpu_threads, in_process=in_process)
    except StepStopped as err:  # a state, not an exception: the paragraph says it all, a traceback would not
        return Cancelled(message=str(err))
    except StepFailed as err:
        return Failed(message=str(err))


@flow(name="llmcycle", log_prints=True)
def run_pipeline(spec_path: str, overrides: list[str] | None = None, force: list[str] | None = None,
                 only: list[str] | None = None, in_process: bool = False) -> dict[str, dict]:
    """Validate the spec, then run each selected step (or reuse its output), branches in parallel.

    `in_process` runs every step inside this process, one at a time: for a debugger, not for production.
    """
    from prefect.runtime import flow_run

    loaded = schemas.load(spec_path, overrides)
    plan = make_plan(loaded, force=force, only=only)
    if in_process:
        check_in_process(plan)
    scheduler = Scheduler(plan, 1 if in_process else loaded.spec.max_parallel, launch.visible_gpus())
    if not in_process and any(p.will_run and not p.run_on for p in plan):
        launch.start_forkserver()
    uri = tracking.tracking_uri(loaded)
    client, experiment = tracking.open_store(loaded)
    parent = tracking.start_parent_run(loaded, client, experiment, str(flow_run.get_id() or ""))
    orphans = tracking.end_orphans(client, experiment, parent)
    if orphans:
        get_run_logger().info(f"marked {len(orphans)} MLflow run(s) that a killed run left RUNNING as KILLED")
    stopper, results, errors, timings, started = Stopper(), {}, {}, {}, time.perf_counter()
    previous = _stop_on_ctrl_c(stopper)
    try:
        _run_all(scheduler, loaded, client, parent, uri, stopper, results, errors, in_process, timings)
    except BaseException as err:  # Ctrl-C, or Prefect's TerminationSignal for SIGTERM and cancellation
        stopper.stop(_why(err))
        client.set_terminated(parent, "KILLED")
        _publish_summary(plan, scheduler, results, errors, uri, client, parent, timings, time.perf_counter() - started)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    failed = {n: e for n, e in errors.items() if not isinstance(e, StepStopped)}
    spent = _publish_summary(plan, scheduler, results, errors, uri, client, parent, timings,
                             time.perf_counter() - started)
    client.set_terminated(parent, "KILLED" if stopper() else "FAILED" if failed else "FINISHED")
    if errors:  # returned, not raised: Prefect logs a traceback for a raised exception; callers still get it
        from prefect.states import Failed

        paragraph = _failure_paragraph(errors, scheduler)
        return Failed(message=paragraph, data=PipelineFailed(paragraph, ledger=spent))
    return {n: {**r.to_json(), "dir": str(r.dir), "status": "cached" if r.reused else "ran"}
            for n, r in results.items()}


def _run_all(scheduler: Scheduler, loaded, client, parent: str, uri: str, stopper: Stopper, results: dict,
             errors: dict, in_process: bool, timings: dict) -> None:
    """Start what is ready, wait for the first to end, repeat; after a stop, let the running steps stop.
    `timings` gets each ended step's seconds from start to end."""
    from concurrent.futures import FIRST_COMPLETED, wait

    running: dict = {}
    begun: dict[str, float] = {}
    try:
        while not scheduler.finished:
            for start in ([] if stopper() else scheduler.start()):
                planned = start.step
                upstream = {d: results[d] for d in planned.deps}
                future = run_step.with_options(task_run_name=f"{planned.kind}:{planned.name}").submit(
                    planned, loaded, upstream, client, parent, uri, start, stopper, in_process)
                running[future] = planned.name
                begun[planned.name] = time.perf_counter()
            if not running:
                break
            done, _ = wait([f.wrapped_future for f in running], timeout=CANCEL_POLL_S, return_when=FIRST_COMPLETED)
            if not done:
                _watch_for_cancel(stopper)
                continue
            future = next(f for f in running if f.wrapped_future in done)
            name = running.pop(future)
            future.wait()
            timings[name] = time.perf_counter() - begun[name]
            if future.state.is_completed():
                results[name] = future.result()
            else:
                errors[name] = (StepStopped if future.state.is_cancelled() else StepFailed)(
                    future.state.message or f"step '{name}' failed")
            scheduler.end(name, ok=name in results)
    except BaseException as err:
        stopper.stop(_why(err))
        for future in list(running):
            try:
                future.wait()
            except BaseException:  # noqa: BLE001 - a second Ctrl-C: stop waiting
                break
        raise


def check_in_process(plan: list[PlannedStep]) -> None:
    from flows.plan import UsageError
    from schemas.resources import TrainerSpec

    for p in plan:
        if p.will_run and (p.run_on or TrainerSpec.model_validate(p.resources).world_size(len(launch.visible_gpus())) > 1):
            raise UsageError(f"--in-process runs steps in this one process; step '{p.name}' needs "
                             + ("a work pool" if p.run_on else "several processes (torchrun)"))


def _stop_on_ctrl_c(stopper: Stopper):
    """Ctrl-C stops the steps even when its KeyboardInterrupt lands inside a library that swallows it (seen in
    Prefect's API client, which the flow polls for a cancel): the handler tells the stopper first, then raises as
    Python's own does. Returns the handler it replaced (None off the main thread, where there is none to set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupted(signum, frame):
        stopper.stop("interrupted (Ctrl-C)")
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, interrupted)


def _watch_for_cancel(stopper: Stopper) -> None:
    """A flow run started from the command line learns of a cancel in Prefect's UI by asking for its state."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.get_id()).state
    except Exception:  # noqa: BLE001 - the API being slow is no reason to stop the pipeline
        return
    if state is not None and (state.is_cancelling() or state.is_cancelled()):
        stopper.stop("the flow run was cancelled in Prefect")


def _why(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _failure_paragraph(errors: dict[str, Exception], scheduler: Scheduler) -> str:
    failed = [n for n, e in errors.items() if isinstance(e, StepFailed)]
    text = " ".join(str(e).rstrip(".") + "." for e in errors.values())
    if len(failed) > 1:
        text = f"{len(failed)} steps failed ({', '.join(failed)}). " + text
    if scheduler.skipped:
        text += f" Not run because a step they need failed: {', '.join(sorted(scheduler.skipped))}."
    trailer = "Outputs of the completed steps are kept; fix the cause and run again to resume from there."
    return text + ("\n" if "\n" in text else " ") + trailer  # after a list of problems, on a line of its own


def _publish_summary(plan: list[PlannedStep], scheduler: Scheduler, results: dict, errors: dict, uri: str, client,
                     parent_run_id: str, timings: dict[str, float], seconds: float) -> dict:
    """Publish the run's ledger (flows/ledger.py) on its parent MLflow run, and a table of its steps with their
    ledger figures as a Prefect artifact (shown on the flow run's page); return the ledger."""
    from prefect.artifacts import create_table_artifact

    status = {p.name: _status(p, scheduler, results.get(p.name), errors.get(p.name)) for p in plan}
    entries = [ledger.Entry(p.name, p.kind, status[p.name], results[p.name].metrics if p.name in results else {},
                            results[p.name].info if p.name in results else {}, timings.get(p.name))
               for p in plan if status[p.name] in ledger.STATUSES]
    spent = ledger.build(entries, seconds)
    figures = {r["step"]: ledger.cells(r) for r in spent["rows"]}
    rows = []
    for planned in plan:
        result = results.get(planned.name)
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in list((result.metrics if result else {}).items())[:6])
        rows.append({**figures.get(planned.name, dict.fromkeys(ledger.HEADERS, "")), "step": planned.name,
                     "kind": planned.kind, "status": status[planned.name],
                     "cached": "yes" if status[planned.name] == "cached" else "no", "metrics": metrics,
                     "mlflow": f"{uri} run {parent_run_id}"})
    rows += [{**ledger.cells(t), "cached": "", "metrics": "", "mlflow": ""} for t in ledger.totals(spent)]
    try:  # the summaries are a convenience; never fail a finished pipeline over them
        tracking.log_ledger(client, parent_run_id, spent, ledger.markdown(spent))
    except Exception as err:  # noqa: BLE001
        get_run_logger().warning("could not log the ledger to MLflow: %s", err)
    try:
        create_table_artifact(key="llmcycle-steps", table=rows, description="Steps of this pipeline run, with "
                              "their time and effort (flows/ledger.py)")
    except Exception as err:  # noqa: BLE001
        get_run_logger().warning("could not publish the Prefect summary artifact: %s", err)
    return spent


def _status(planned: PlannedStep, scheduler: Scheduler, result: StepResult | None, error: Exception | None) -> str:
    if not planned.selected:
        return "not selected"
    if result is not None:
        return "cached" if result.reused else "ran"
    if error is not None:
        return "stopped" if isinstance(error, StepStopped) else "failed"
    return "skipped" if planned.name in scheduler.skipped else "-"


def format_failure(err: BaseException) -> str:
    """One paragraph for the terminal: the steps and their causes, not a traceback."""
    chain = err
    while chain is not None and not isinstance(chain, (PipelineFailed, StepFailed, StepStopped)):
        chain = chain.__cause__ or chain.__context__
    return str(chain) if chain is not None else "".join(traceback.format_exception_only(type(err), err)).strip()
